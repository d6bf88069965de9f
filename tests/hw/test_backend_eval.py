"""Evaluation under the `h800` backend: the validation loss is averaged over the data ranks
(DP2) and runs as a forward-only pipeline (PP2), and equals the single-process eval loss on
the same global batches; every rank logs the same value."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp
from backend_runs import free_port, small_model, use_env

SHRINK = [
    *small_model(),
    "train.steps=4", "train.log_every=1", "train.eval_every=2", "train.eval_batches=2",
    "tracking.tracker=null", "checkpoint.every=100",
]
TOL = 2e-3  # as the training-loss comparisons (summation order only)


def _evals(overrides: list[str]) -> list[float]:
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run, train

    run = build_run(load_config("tiny", [*SHRINK, *overrides]))
    train(run)
    return [h["eval/loss"] for h in run.history if "eval/loss" in h]


def _worker(rank: int, world: int, port: int, cache: str, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    use_env(cache)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(_evals(["parallel.backend=h800", *overrides]), f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_under_dp2_and_pp2_matches_single_process(tmp_path):
    cache = str(tmp_path / "cache")
    use_env(cache)
    want = _evals(["train.micro_batch_size=2", f"checkpoint.dir={tmp_path / 'single'}"])
    assert len(want) == 2
    layouts = {"dp2": ["train.micro_batch_size=1"],
               "pp2": ["parallel.options.pp=2", "parallel.options.n_microbatches=2",
                       "train.micro_batch_size=2"]}
    for name, opts in layouts.items():
        out = str(tmp_path / name)
        mp.spawn(_worker, args=(2, free_port(), cache, [*opts, f"checkpoint.dir={out}-ck"], out),
                 nprocs=2, join=True)
        per_rank = [json.load(open(f"{out}.{r}")) for r in range(2)]
        assert per_rank[0] == per_rank[1], name  # every rank logs the global value
        worst = max(abs(a - b) for a, b in zip(per_rank[0], want, strict=True))
        assert worst < TOL, (name, per_rank[0], want)
