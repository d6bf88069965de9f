"""`k2 rl` under the h800 backend (DP2, 2 gloo ranks) beside one process: the same config and seeds.

    uv run python bench/bench_rl_backend.py [--iters 3] [--threads 2] [--json]

Both runs use the `rl-math` config cut to K=4 samples x 8 prompts and a budget of 48 tokens
(partial rollout off) on a `tiny`-preset model with random weights and a small BPE tokenizer,
both in fp32 (parallel.options.dtype=fp32). One process runs with `--threads` torch threads
(2: the machine's cores); DP2 runs 2 processes of 1 thread each. Measure on an idle box: on a
loaded one a 2-thread process waits for both of its threads at every parallel region and the
one-process figures collapse (at a load average of 5 here, one process at 2 threads took 9x
DP2's time an iteration). Under DP2 each rank generates half of each iteration's samples,
scores half the groups and trains on them; the engines get each version by the sharded weight
push (each rank sends its half of the rows to both engines over TCP). Prints the median
seconds of each phase of an iteration (after the first), rollout tokens/s and the weight push
in MB/s, side by side, with the DP2 / one-process ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s")


def _cfg(init: str, run_dir: str, iters: int, extra: list[str]):
    from k2_core.configio import load_config
    from k2_rl.builtin_configs import config_path

    return load_config(
        config_path("rl-math"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={iters}",
            "train.eval_every=0",
            f"checkpoint.every={iters}",
            "tracking.tracker=null",
            "data.options.builtin_n=50",
            "plugins.rl.partial_rollout=false",
            "plugins.rl.k=4",
            "plugins.rl.prompts_per_iter=8",
            "plugins.rl.default_budget=48",
            "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 48}]",
            *extra,
        ],
    )


def _summary(history: list[dict[str, float]]) -> dict[str, float]:
    rows = history[1:] or history  # the first iteration warms up
    out = {k: statistics.median(h[k] for h in rows) for k in PHASES}
    out["iteration_s"] = sum(out[k] for k in PHASES)
    out["rollout_tokens_per_s"] = statistics.median(h["rollout/tokens_per_s"] for h in rows)
    out["sync_mb_per_s"] = statistics.median(h["sync/mb_per_s"] for h in rows)
    out["reward_mean_last"] = history[-1]["rl/reward_mean"]
    return out


def one_process(init: str, root: str, iters: int, threads: int = 2) -> dict[str, float]:
    """Median phase seconds of `iters` iterations in this process (`threads` threads)."""
    from k2_rl.rl_stage import RLTrainer

    torch.set_num_threads(threads)
    trainer = RLTrainer(_cfg(init, f"{root}/one", iters, []))
    trainer.train()
    return _summary(trainer.history)


def _worker(rank: int, port: int, init: str, root: str, iters: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from k2_rl.rl_stage import RLTrainer

    try:
        trainer = RLTrainer(
            _cfg(
                init, f"{root}/dp2", iters, ["parallel.backend=h800", "parallel.options.dtype=fp32"]
            )
        )
        trainer.train()
        if rank == 0:
            Path(out).write_text(json.dumps(_summary(trainer.history)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def dp2(init: str, root: str, iters: int) -> dict[str, float]:
    """The same under parallel.backend=h800 with 2 gloo ranks (1 thread each)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"{root}/dp2.json"
    mp.spawn(_worker, args=(port, init, root, iters, out), nprocs=2, join=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from bench_rl import tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        init, _ = tiny_checkpoint(Path(tmp))
        a = one_process(init, tmp, args.iters, args.threads)
        b = dp2(init, tmp, args.iters)
    if args.json:
        print(json.dumps({"one_process": a, "dp2": b}, indent=2))
        return
    print(f"{'':26s}{'one process':>14s}{'DP2 (h800)':>14s}{'DP2/one':>10s}")
    for k in (*PHASES, "iteration_s", "rollout_tokens_per_s", "sync_mb_per_s"):
        ratio = b[k] / a[k] if a[k] else float("nan")
        print(f"{k:26s}{a[k]:14.3f}{b[k]:14.3f}{ratio:10.2f}")


if __name__ == "__main__":
    main()
