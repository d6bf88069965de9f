"""The configs shipped with k2-rl (`sft-math`, `rl-math`, `rl-code`), found by name."""

from __future__ import annotations

from importlib import resources

BUILTIN_CONFIGS = ("sft-math", "rl-math", "rl-code")


def config_path(spec: str) -> str:
    """A packaged config name (sft-math, rl-math, rl-code) -> its file; anything else unchanged."""
    if spec in BUILTIN_CONFIGS:
        return str(resources.files("k2_rl").joinpath("configs", f"{spec}.yaml"))
    return spec
