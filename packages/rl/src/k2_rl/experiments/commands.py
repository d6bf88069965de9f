"""`k2 experiment NAME [CONFIG] [overrides] [--scale X] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from k2_core.cli import Command


def _run(args: argparse.Namespace) -> int:
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
    r = run_experiment(args.name, args.out or f"runs/experiment-{args.name}", config or "tiny",
                       overrides, scale=args.scale, num_threads=args.threads, **kwargs)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    print(f"k2 experiment {args.name}: {r['seconds']:.0f}s; report {r['report']}; plot {r['png']}; "
          f"mlflow {r['tracking_uri']} experiment {r['mlflow_experiment']}")
    return 0


def experiment_command(*, options: Any) -> Command:
    """Run a design experiment (sparsity, heads, rephrase, qk_clip, muon_vs_adamw): tracked
    runs, a PNG and a markdown report."""

    def add(p: argparse.ArgumentParser) -> None:
        from . import EXPERIMENT_NAMES  # import-light: torch loads when an experiment runs

        p.add_argument("name", choices=EXPERIMENT_NAMES)
        p.add_argument("config", nargs="?", default=None, help="preset name or YAML (default tiny)")
        p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
        p.add_argument("--out", help="output folder (default runs/experiment-NAME)")
        p.add_argument("--scale", type=float, default=1.0,
                       help="multiplies the experiment's size (steps; rephrase: world and steps)")
        p.add_argument("--generator", help="rephrase: generator endpoint for `k2 rephrase`")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--json", action="store_true", help="print JSON")

    return Command("experiment", (experiment_command.__doc__ or "").replace("\n    ", " "), add, _run)
