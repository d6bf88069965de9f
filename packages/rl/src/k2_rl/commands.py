"""`k2 sft`, `k2 rl` and `k2 rl-demo`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from k2_core.command import Command

from .builtin_configs import BUILTIN_CONFIGS, config_path  # noqa: F401 (also importable here)


def _load(args: argparse.Namespace, default: str) -> Any:
    from k2_core.configio import load_config

    spec, overrides = args.config, list(args.overrides)
    if spec is None or "=" in spec:
        spec, overrides = default, ([spec] if spec else []) + overrides
    return load_config(config_path(spec), overrides)


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"config name ({', '.join(BUILTIN_CONFIGS)}) or YAML file/URI (default {default})",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. plugins.rl.k=4")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _sft_run(args: argparse.Namespace) -> int:
    from .sft import run_sft

    cfg = _load(args, "sft-math")
    t0 = time.perf_counter()
    s = run_sft(cfg, progress=not args.json)
    secs = time.perf_counter() - t0
    if s.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps({**s, "seconds": secs}))
        return 0
    loss = (
        f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"
        if s["last_loss"] is not None
        else "no steps run (already complete)"
    )
    ev = f" (eval {s['eval_loss']:.3f})" if s["eval_loss"] is not None else ""
    print(
        f"k2 sft: {s['steps']} steps in {secs:.0f}s, {loss}{ev}; run folder {s['run_dir']}"
        + (f"; mlflow run {s['tracking_run_id']}" if s["tracking_run_id"] else "")
    )
    return 0


def sft_command(*, options: Any) -> Command:
    """Supervised fine-tuning of a k2 checkpoint on chat data (loss on assistant tokens)."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_config_args(p, "sft-math")

    return Command(sft_command.__doc__ or "", add, _sft_run)


def _print_progress(step: int, m: dict[str, float]) -> None:
    evals = " ".join(
        f"{k.split('/')[1]} pass@1 {v:.3f}" for k, v in m.items() if k.startswith("eval/")
    )
    print(
        f"rl step {step}: reward {m.get('rl/reward_mean', 0):.3f} "
        f"pass {m.get('rl/pass_rate', 0):.3f} len {m.get('rl/response_tokens', 0):.0f} "
        f"T {m.get('rl/temperature', 0):.2f} rollout {m.get('rollout/tokens_per_s', 0):.0f} tok/s"
        + (f" | {evals}" if evals else ""),
        flush=True,
    )


def _rl_run(args: argparse.Namespace) -> int:
    from .rl_stage import run_rl

    cfg = _load(args, "rl-math")
    s = run_rl(cfg, None if args.json else _print_progress)
    if s.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps(s))
        return 0
    p1 = "; ".join(f"{k} held-out pass@1 {a:.3f} -> {b:.3f}" for k, (a, b) in s["pass@1"].items())
    rw = (
        f"reward {s['first_reward']:.3f} -> {s['last_reward']:.3f}"
        if s["last_reward"] is not None
        else "no steps run (already complete)"
    )
    print(
        f"k2 rl: {s['steps']} iterations in {s['seconds']:.0f}s, {rw}"
        + (f"; {p1}" if p1 else "")
        + f"; run folder {s['run_dir']}"
        + (f"; mlflow run {s['tracking_run_id']}" if s["tracking_run_id"] else "")
    )
    return 0


def rl_command(*, options: Any) -> Command:
    """RL with the K1.5 objective: rollouts, verifiable rewards, partial rollout, MuonClip."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_config_args(p, "rl-math")

    return Command(rl_command.__doc__ or "", add, _rl_run)


def _demo_run(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    extra = {"rl": list(args.rl_set), "code": list(args.rl_set)}
    settings = DemoSettings(
        out=args.out,
        seeds=tuple(args.seeds),
        quick=args.quick,
        code=not args.no_code,
        threads=args.threads,
        extra=extra,
        **({"rl_steps": args.rl_steps} if args.rl_steps else {}),
    )
    report = run_demo(settings)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(report["summary"])
    return 0


def demo_command(*, options: Any) -> Command:
    """The post-training demonstration: pretrain -> sft -> rl on arithmetic (+ a code run)."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="runs/rl-demo", help="output folder")
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds")
        p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
        p.add_argument("--no-code", action="store_true", help="skip the code-reward run")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--rl-steps", type=int, default=None, help="RL iterations per seed")
        p.add_argument(
            "--rl-set",
            action="append",
            default=[],
            help="dotted override for the RL runs (repeatable), e.g. optim.lr=2e-4",
        )
        p.add_argument("--json", action="store_true", help="print the report as JSON")

    return Command(demo_command.__doc__ or "", add, _demo_run)
