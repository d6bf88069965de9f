"""Evaluation under the `h800` backend: the validation loss is averaged over the data ranks
(DP2) and runs as a forward-only pipeline (PP2), and equals the single-process eval loss on
the same global batches; every rank logs the same value. Routing is tie-free by construction
and checked (backend_runs.fix_routing)."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp
from backend_runs import (
    EXACT_NS,
    LOSS_TOL,
    build_tie_free,
    free_port,
    small_model,
    use_env,
    worst_loss_gap,
)

SHRINK = [
    *small_model(),
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "tracking.tracker=null",
    "checkpoint.every=100",
    *EXACT_NS,
]


def _evals(overrides: list[str]) -> list[float]:
    """Train with tie-free routing (checked, eval batches included); the eval losses."""
    from k2_core.orchestrator import train

    run, margin = build_tie_free([*SHRINK, *overrides])
    train(run)
    margin.check(f"eval rank {os.environ.get('RANK', 'single')}")
    return [h["eval/loss"] for h in run.history if "eval/loss" in h]


def _worker(rank: int, world: int, port: int, cache: str, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    use_env(cache)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(
                _evals(["parallel.backend=h800", "parallel.options.dtype=fp32", *overrides]), f
            )
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
    layouts = {
        "dp2": ["train.micro_batch_size=1"],
        "pp2": [
            "parallel.options.pp=2",
            "parallel.options.n_microbatches=2",
            "train.micro_batch_size=2",
        ],
    }
    for name, opts in layouts.items():
        out = str(tmp_path / name)
        mp.spawn(
            _worker,
            args=(2, free_port(), cache, [*opts, f"checkpoint.dir={out}-ck"], out),
            nprocs=2,
            join=True,
        )
        per_rank = [json.load(open(f"{out}.{r}")) for r in range(2)]
        assert per_rank[0] == per_rank[1], name  # every rank logs the global value
        # tie-free routing, fp32 Newton-Schulz: summation order only (backend_runs.LOSS_TOL)
        assert worst_loss_gap(per_rank[0], want, f"eval {name}") < LOSS_TOL, (
            name,
            per_rank[0],
            want,
        )
