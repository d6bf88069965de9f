"""`k2 synth-tools CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

from k2_core.command import Command

from ..pipeline.cli import add_run_arguments, spec_and_overrides


def _run(args: argparse.Namespace) -> int:
    from ..pipeline.configload import load_model_config
    from . import run_synth_tools
    from .config import SynthToolsConfig

    spec, overrides = spec_and_overrides(args)
    cfg = load_model_config(SynthToolsConfig, spec, overrides)
    summary = run_synth_tools(cfg)
    print(summary.line())
    return 0 if summary.complete else 1


def synth_tools_command(*, options: object) -> Command:
    """Synthesise tool specs, agents, tasks and judged tool-use trajectories (resumable)."""
    return Command(synth_tools_command.__doc__ or "", add_run_arguments, _run)
