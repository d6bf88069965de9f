"""The unit every source yields and every pipeline consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One text with a stable id and its domain (web, code, math, knowledge, ...)."""

    id: str
    text: str
    domain: str
