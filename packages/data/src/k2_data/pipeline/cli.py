"""What `k2 rephrase` and `k2 synth-tools` share on the command line."""

from __future__ import annotations

import argparse
from typing import Any


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG, dotted overrides and the common pipeline flags."""
    p.add_argument("config", nargs="?", default=None, help="YAML file/URI (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. n_rephrasings=4")
    p.add_argument("--out", default=None, help="output folder URI (pipeline.out)")
    p.add_argument("--executor", choices=["local", "ray"], default=None, help="pipeline.executor")
    p.add_argument("--concurrency", type=int, default=None, help="pipeline.concurrency")


def spec_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config spec and the overrides, flags included (`k2 rephrase a=b` has no spec)."""
    spec, overrides = args.config, list(args.overrides)
    if spec is not None and "=" in spec and "://" not in spec.split("=", 1)[0]:
        spec, overrides = None, [spec, *overrides]
    if args.out:
        overrides.append(f"pipeline.out={args.out}")
    if args.executor:
        overrides.append(f"pipeline.executor={args.executor}")
    if args.concurrency:
        overrides.append(f"pipeline.concurrency={args.concurrency}")
    return spec, overrides


def report(summary: Any) -> int:
    """Print the summary; exit code 0 when complete, 1 when items are left to retry."""
    print(summary.line())
    return 0 if summary.complete else 1
