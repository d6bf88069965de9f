"""The `h800` backend trains a shrunk `tiny` model under several 4-/2-process gloo layouts and
matches the single-process run on the same global batch; its checkpoints hold the
single-process layout and load under any other layout (ZeRO-1 optimizer state included).

Routing is tie-free by construction and checked (backend_runs.fix_routing, RoutingMargin), and
Newton-Schulz runs in fp32, so the runs differ only in floating-point summation order
(all-reduce, expert batching): losses and checkpoint tensors agree within
backend_runs.LOSS_TOL / LAYOUT_BOUNDS (the reasoning is written beside them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from backend_runs import (
    EXACT_NS,
    LOSS_TOL,
    assert_layout_equal,
    distributed_losses,
    small_model,
    train_losses,
    use_env,
    worst_loss_gap,
)

STEPS, EVERY = 10, 3
SHRINK = [
    *small_model(),
    f"train.steps={STEPS}",
    "train.micro_batch_size=1",
    "train.log_every=1",
    "train.eval_every=0",
    "tracking.tracker=null",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep=5",
    *EXACT_NS,
]
GLOBAL_SEQS = 4  # sequences per optimizer step in every layout


def _distributed(world: int, cache: str, overrides: list[str], tmp: Path) -> list[float]:
    out = str(tmp / "losses")
    per_rank = distributed_losses(world, cache, SHRINK, overrides, out)
    assert all(p == per_rank[0] for p in per_rank)  # every rank logs the global loss
    return per_rank[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run: 4 micro-batches of 1 sequence per step."""
    tmp = tmp_path_factory.mktemp("single")
    cache = str(tmp_path_factory.mktemp("cache"))
    use_env(cache)
    losses = train_losses(SHRINK, [f"train.grad_accum={GLOBAL_SEQS}", f"checkpoint.dir={tmp}"])
    assert len(losses) == STEPS and losses[-1] < losses[0]
    return {"losses": losses, "dir": tmp, "cache": cache}


def _close(got: list[float], want: list[float], what: str = "") -> None:
    assert worst_loss_gap(got, want, what) < LOSS_TOL, (got, want)


def _ckpt(d: Path, step: int) -> str:
    return str(d / "checkpoints" / f"step_{step:08d}")


LAYOUTS = {  # name: (world, options, grad_accum); dp * ep * grad_accum = 4 sequences a step
    "dp2xep2": (4, ["parallel.options.ep=2"], 1),
    "ep4": (4, ["parallel.options.ep=4"], 1),
    "dp2": (2, [], 2),
    "dp2_zero0": (2, ["parallel.options.zero_stage=0"], 2),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, layout):
    world, opts, accum = LAYOUTS[layout]
    got = _distributed(
        world,
        reference["cache"],
        [*opts, f"train.grad_accum={accum}", f"checkpoint.dir={tmp_path}"],
        tmp_path,
    )
    _close(got, reference["losses"], layout)
    # the checkpoint is in the single-process layout: same arrays, same shapes, close values
    assert_layout_equal(_ckpt(reference["dir"], STEPS), _ckpt(tmp_path, STEPS))


@pytest.mark.slow
@pytest.mark.distributed
def test_layouts_reshard_both_ways(tmp_path, reference):
    """single (step 3) -> DP2xEP2 (steps 4..10), then DP2xEP2's step 6 -> single (7..10)."""
    d1 = tmp_path / "to_dist"
    (d1 / "checkpoints").mkdir(parents=True)
    shutil.copytree(_ckpt(reference["dir"], EVERY), _ckpt(d1, EVERY))
    got = _distributed(
        4,
        reference["cache"],
        ["parallel.options.ep=2", "train.grad_accum=1", f"checkpoint.dir={d1}"],
        tmp_path,
    )
    _close(got, reference["losses"][EVERY:], "single -> dp2xep2")
    d2 = tmp_path / "to_single"
    (d2 / "checkpoints").mkdir(parents=True)
    shutil.copytree(_ckpt(d1, 2 * EVERY), _ckpt(d2, 2 * EVERY))  # written under DP2 x EP2
    use_env(reference["cache"])
    got = train_losses(SHRINK, [f"train.grad_accum={GLOBAL_SEQS}", f"checkpoint.dir={d2}"])
    _close(got, reference["losses"][2 * EVERY :], "dp2xep2 -> single")
