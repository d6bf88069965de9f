"""`k2 experiment NAME [CONFIG] [overrides] [--scale X] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from k2_core.command import Command


def _run(args: argparse.Namespace) -> int:
    from k2_core.harness import print_result

    from . import run_experiment

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `k2 experiment heads train.steps=50`
        config, overrides = None, [config, *overrides]
    kwargs: dict[str, Any] = {}
    if args.json:  # progress to stderr, so that stdout is the JSON alone
        kwargs["echo"] = lambda line: print(line, file=sys.stderr)
    if args.generator:
        if args.name != "rephrase":
            from k2_core.errors import ConfigError

            raise ConfigError("--generator applies to the rephrase experiment only")
        kwargs["generator"] = args.generator
    r = run_experiment(
        args.name,
        args.out or f"runs/experiment-{args.name}",
        config or "tiny",
        overrides,
        scale=args.scale,
        num_threads=args.threads,
        **kwargs,
    )
    return print_result(f"k2 experiment {args.name}", r, args.json)


def experiment_command(*, options: Any) -> Command:
    """Run a design experiment (sparsity, heads, rephrase, qk_clip, muon_vs_adamw): tracked
    runs, a PNG and a markdown report."""

    def add(p: argparse.ArgumentParser) -> None:
        from k2_core.harness import add_arguments

        from . import EXPERIMENT_NAMES  # import-light: torch loads when an experiment runs

        add_arguments(p, EXPERIMENT_NAMES, default_out="runs/experiment-NAME", config=True)
        p.add_argument("--generator", help="rephrase: generator endpoint for `k2 rephrase`")

    return Command((experiment_command.__doc__ or "").replace("\n    ", " "), add, _run)
