"""Shared fixtures: a clean process-wide plugin cache per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helper modules (rl_fixtures, serve_fixture, ...) live beside the tests that made them,
# shared ones (small_model) in tests/ itself; put every tests/ folder on the path so a test file
# run alone still finds them.
for _d in [Path(__file__).parent, *sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir())]:
    if str(_d) not in sys.path:
        sys.path.append(str(_d))


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees plugins loaded under its own environment (K2_LOAD_PLUGINS included)."""
    import k2_core.plugins as plugins

    monkeypatch.setattr(plugins, "_cached", None)
    yield
