"""`k2 rephrase CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

from k2_core.command import Command

from ..pipeline.cli import add_run_arguments, report, spec_and_overrides


def _run(args: argparse.Namespace) -> int:
    from ..pipeline.configload import load_model_config
    from . import run_rephrase
    from .config import RephraseConfig

    spec, overrides = spec_and_overrides(args)
    cfg = load_model_config(RephraseConfig, spec, overrides)
    return report(run_rephrase(cfg))


def rephrase_command(*, options: object) -> Command:
    """Rewrite documents in several styles, checked for fidelity (resumable)."""
    return Command(rephrase_command.__doc__ or "", add_run_arguments, _run)
