"""`k2 plan`: the parallel layout and per-GPU memory of a model on a cluster."""

from __future__ import annotations

import argparse
import json
from typing import Any

from k2_core.command import Command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="k2-1t", help="preset name or YAML file/URI (default k2-1t)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--cluster", default="h800", help="node type: h800, h100 or h200")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the config's data.seq_len)",
    )
    p.add_argument(
        "--global-batch-tokens",
        default="67M",
        help="tokens per optimizer step, e.g. 67M (default, K2's 2^26)",
    )
    p.add_argument(
        "--policy",
        default="auto",
        choices=["auto", "none", "recompute", "recompute+fp8", "recompute+fp8+offload"],
        help="activation policy (auto: the least aggressive that fits)",
    )
    p.add_argument("--pp", type=int, default=None, help="force the pipeline degree")
    p.add_argument("--ep", type=int, default=None, help="force the expert-parallel degree")
    p.add_argument("--virtual-stages", type=int, default=None, help="force virtual stages per rank")
    p.add_argument(
        "--micro-batch-size", type=int, default=None, help="force sequences per micro-batch"
    )
    p.add_argument(
        "--master-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count FP32 master weights in the ZeRO-1 optimizer state (default: yes, "
        "the h800 backend's bf16 policy)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="also build sampled ranks of the plan on meta tensors over a fake "
        "process group, run one step and a counted checkpoint save, and compare "
        "what each holds with the plan (exit 1 if any differs by more than 5%%)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run(args: argparse.Namespace) -> int:
    from k2_core.configio import load_config

    from .cluster import cluster_preset
    from .plan import PlanOptions, human_tokens, make_plan, plan_summary

    cfg = load_config(args.model, [], check={"model", "moe"})
    cluster = cluster_preset(args.cluster, args.nodes)
    opts = PlanOptions(
        seq_len=args.seq_len or cfg.data.seq_len,
        global_batch_tokens=human_tokens(args.global_batch_tokens),
        policy=args.policy,
        pp=args.pp,
        ep=args.ep,
        virtual_stages=args.virtual_stages,
        micro_batch_size=args.micro_batch_size,
        master_weights=args.master_weights,
    )
    plan = make_plan(cfg.model, cfg.moe, cluster, opts, model_name=cfg.name or args.model)
    if not args.dry_run:
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan_summary(plan))
        return 0
    from .dryrun import dry_run, dry_run_table

    report = dry_run(args.model, plan)
    if args.json:
        print(json.dumps({**report, "plan": plan.to_dict()}, indent=2))
    else:
        print(plan_summary(plan))
        print(dry_run_table(report))
    return 0 if report["ok"] else 1


def plan_command(*, options: Any) -> Command:
    """Plan pipeline/expert/data parallelism, micro-batching and per-GPU memory on a cluster."""
    return Command(plan_command.__doc__ or "", _add, _run)
