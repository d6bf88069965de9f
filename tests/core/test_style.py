"""One code style, enforced: `ruff check` (E501 at 100 columns included) and `ruff format
--check` pass on the whole repository, so CI fails on a line or layout the house does not use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _ruff() -> str:
    here = Path(sys.executable).parent / "ruff"
    found = str(here) if here.exists() else shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with `uv sync`'s dev group)")
    return found


@pytest.mark.parametrize(
    "args", [["check", "--quiet"], ["format", "--check", "--quiet"]], ids=["lint", "format"]
)
def test_ruff_passes_on_the_repository(args: list[str]) -> None:
    """Lint and layout hold everywhere ruff looks (its config: pyproject.toml, line-length 100)."""
    out = subprocess.run([_ruff(), *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout[-3000:]}{out.stderr[-1000:]}"
