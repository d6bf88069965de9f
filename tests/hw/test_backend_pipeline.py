"""Pipeline layouts of the `h800` backend (k2_hw_h800.pipeline under the backend): PP2 x EP2 on
4 gloo processes and PP2 with 2 virtual stages per rank (interleaved 1F1B) on 2 match the
single-process run on the same global batch, and their checkpoints hold the whole model in
the single-process layout (each tensor from the stage that trains it).

Routing is tie-free by construction and checked (backend_runs.fix_routing, RoutingMargin);
losses and checkpoint tensors agree within backend_runs.LOSS_TOL / LAYOUT_BOUNDS (float
reduction order only; the reasoning is written beside them)."""

from __future__ import annotations

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

STEPS = 10
SHRINK = [
    *small_model(4),
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "tracking.tracker=null",
    f"checkpoint.every={STEPS}",
    *EXACT_NS,
]
LAYOUTS = {  # name: (world, backend options, micro batch, grad_accum of the 1-process reference)
    "pp2xep2": (
        4,
        [
            "parallel.options.pp=2",
            "parallel.options.ep=2",
            "parallel.options.n_microbatches=2",
            "train.micro_batch_size=2",
        ],
        2,
        2,
    ),
    "pp2_vs2": (
        2,
        [
            "parallel.options.pp=2",
            "parallel.options.virtual_stages=2",
            "parallel.options.n_microbatches=2",
            "train.micro_batch_size=4",
        ],
        4,
        1,
    ),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(tmp_path, cache, layout):
    world, opts, micro, accum = LAYOUTS[layout]
    use_env(cache)
    single = tmp_path / "single"
    want = train_losses(
        SHRINK,
        [
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"checkpoint.dir={single}",
        ],
    )
    dist_dir = tmp_path / "dist"
    out = str(tmp_path / "losses")
    per_rank = distributed_losses(world, cache, SHRINK, [*opts, f"checkpoint.dir={dist_dir}"], out)
    assert all(p == per_rank[0] for p in per_rank)
    got = per_rank[0]
    assert len(got) == len(want) == STEPS
    assert worst_loss_gap(got, want, layout) < LOSS_TOL, (got, want)
    name = f"checkpoints/step_{STEPS:08d}"
    assert_layout_equal(str(single / name), str(dist_dir / name))
