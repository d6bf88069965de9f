"""Shared fixtures: a clean process-wide plugin cache per test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees plugins loaded under its own environment (K2_LOAD_PLUGINS included)."""
    import k2_core.plugins as plugins

    monkeypatch.setattr(plugins, "_cached", None)
    yield
