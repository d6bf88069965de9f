"""`k2 eval URI --tasks ...`: the built-in offline tasks on one checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from k2_core.command import Command

DEFAULT_TASKS = "perplexity,arithmetic,knowledge_qa,code"


def _run(args: argparse.Namespace) -> int:
    from .runner import eval_options, format_table, parse_tasks, run_eval

    tasks = parse_tasks(args.tasks)  # checked before the checkpoint loads
    options = eval_options(args.overrides)
    echo = None if args.json else print
    result = run_eval(
        args.uri,
        tasks,
        options=options,
        limit=args.limit,
        data=args.data,
        tokenizer=args.tokenizer,
        track=not args.no_track,
        tracking_uri=args.tracking_uri,
        echo=echo,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(format_table(result))
    tr = result.get("tracking") or {}
    if tr.get("run_id"):
        where = "the checkpoint's training run" if tr["attached_to_training_run"] else "a new run"
        print(f"logged as eval/<task>/<metric> to {where} {tr['run_id']} ({tr['tracking_uri']})")
    return 0


def eval_command(*, options: Any) -> Command:
    """Evaluate a checkpoint: perplexity, arithmetic, knowledge_qa, code (table, JSON, mlflow)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("uri", help="checkpoint URI (a run's step_N folder or a saved model)")
        p.add_argument(
            "overrides",
            nargs="*",
            help="task options as dotted overrides, e.g. arithmetic.k=8 knowledge_qa.shots=5",
        )
        p.add_argument(
            "--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default {DEFAULT_TASKS})"
        )
        p.add_argument("--limit", type=int, default=None, help="at most N items per task")
        p.add_argument("--data", help="packed dataset URI (default: the run's dataset)")
        p.add_argument("--tokenizer", help="saved k2 tokenizer folder (default: the dataset's)")
        p.add_argument(
            "--tracking-uri", help="mlflow store (default: the checkpoint's training run)"
        )
        p.add_argument("--no-track", action="store_true", help="do not log to mlflow")
        p.add_argument("--json", action="store_true", help="print JSON")

    return Command(eval_command.__doc__ or "", add, _run)


def _lm_eval_run(args: argparse.Namespace) -> int:
    from .lm_eval_cli import main

    return main(list(args.lm_eval_args))


def lm_eval_command(*, options: Any) -> Command:
    """lm-evaluation-harness, `k2` model: k2 lm-eval --model k2 --model_args path=URI --tasks ..."""

    def add(p: argparse.ArgumentParser) -> None:
        # Every argument, options included, is lm-eval's: with no prefix characters of its
        # own this parser takes `--model ...` as plain words (and `--help` is lm-eval's).
        p.prefix_chars = "\0"
        p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")

    return Command(lm_eval_command.__doc__ or "", add, _lm_eval_run)
