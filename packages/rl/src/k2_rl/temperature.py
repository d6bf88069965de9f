"""Sampling-temperature decay over RL training: from a high temperature to a low one."""

from __future__ import annotations

import math
from typing import Literal


def temperature_at(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    kind: Literal["linear", "cosine", "exponential", "constant"] = "cosine",
) -> float:
    """The sampling temperature at iteration `step` of `total_steps` (start at 0, end at the
    last)."""
    if kind == "constant" or total_steps <= 1:
        return start
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "exponential":
        return start * (end / start) ** frac
    raise ValueError(f"unknown temperature schedule {kind!r}")
