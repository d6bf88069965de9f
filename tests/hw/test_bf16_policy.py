"""The h800 default precision (issue 14 item 3): BF16 weights, FP32 gradient accumulation
buffers, FP32 master weights and optimizer state ZeRO-sharded beside them.

A DP2 x EP2 run equals the same policy in one process (the h800 backend at world size 1),
its checkpoint holds BF16 weights and FP32 master weights / state, and it resumes under
another layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from backend_runs import (
    EXACT_NS,
    checkpoint_gaps,
    distributed_losses,
    small_model,
    use_env,
    worst_loss_gap,
)

STEPS = 4
SHRINK = [
    *small_model(),
    f"train.steps={STEPS}",
    "train.micro_batch_size=1",
    "train.log_every=1",
    "train.eval_every=0",
    "tracking.tracker=null",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    *EXACT_NS,
]
# Autograd hands back BF16 gradients (rounded to 2^-9 relative) for BF16 weights before they
# reach the FP32 buffers, and a layout batches tokens differently (an expert's weight gradient
# over two ranks' tokens in one matmul, or one sequence at a time), so the rounded gradients
# differ by ~2^-9 relative; the FP32 sums then differ by reduction order only. Measured after 4
# steps: losses 1.5e-5 absolute; weights, masters and moments 5e-3 to 7e-3 relative. The bounds
# are ~3x that; a re-routed token or a wrong shard moves them by O(1).
LOSS_TOL = 2e-4
BOUNDS = {
    "model": 2e-2,
    "optim.master": 2e-2,
    "optim.exp_avg": 2e-2,
    "optim.momentum_buffer": 2e-2,
    "optim.exp_avg_sq": 3e-2,
    "bias": 0.0,
    "optim.step": 0.0,
}


def _ckpt(d: Path, step: int) -> str:
    return str(d / "checkpoints" / f"step_{step:08d}")


def _run(world: int, cache: str, tmp: Path, extra: list[str]) -> list[float]:
    # after backend_runs' fp32 default, so it wins
    per_rank = distributed_losses(
        world,
        cache,
        SHRINK,
        ["parallel.options.dtype=bf16", f"checkpoint.dir={tmp}", *extra],
        str(tmp / "losses"),
    )
    assert all(p == per_rank[0] for p in per_rank)
    return per_rank[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same policy in one process: the h800 backend at world size 1, 4 micro-batches."""
    tmp = tmp_path_factory.mktemp("bf16_single")
    cache = str(tmp_path_factory.mktemp("cache"))
    use_env(cache)
    losses = _run(1, cache, tmp, ["train.grad_accum=4"])
    return {"losses": losses, "dir": tmp, "cache": cache}


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_policy_dp2xep2_matches_one_process(tmp_path, one_process):
    from k2_core.checkpoint import load_tensors

    got = _run(4, one_process["cache"], tmp_path, ["parallel.options.ep=2"])
    assert worst_loss_gap(got, one_process["losses"], "bf16 dp2xep2") < LOSS_TOL
    for kind, (rel, where) in checkpoint_gaps(
        _ckpt(one_process["dir"], STEPS), _ckpt(tmp_path, STEPS)
    ).items():
        assert rel <= BOUNDS[kind], (kind, where, rel)
    tensors, _ = load_tensors(_ckpt(tmp_path, STEPS))
    weights = {
        k: v
        for k, v in tensors["model"].items()
        if v.is_floating_point() and "e_score_correction_bias" not in k and "expert_counts" not in k
    }
    masters = {k: v for k, v in tensors["optim"].items() if k.endswith(".master")}
    assert weights and all(v.dtype.itemsize == 2 for v in weights.values())  # BF16 weights
    assert len(masters) == len(weights) and all(v.dtype.itemsize == 4 for v in masters.values())
    # the BF16 weight is its master rounded (QK-Clip aside: it scales both in place)
    name = next(k for k in weights if "experts" in k)
    assert (
        tensors["optim"][f"{name}.master"].to(weights[name].dtype) == weights[name]
    ).float().mean() > 0.99

    # resume step 2 of the DP2 x EP2 run at PP2 x EP2 (another layout, masters and moments
    # re-cut): the same last losses
    pp2xep2 = ["parallel.options.pp=2", "parallel.options.ep=2", "train.micro_batch_size=2"]
    for world, opts in ((4, pp2xep2),):
        d = tmp_path / f"resume{world}"
        d.mkdir()
        import shutil

        shutil.copytree(_ckpt(tmp_path, 2), _ckpt(d, 2))
        again = _run(world, one_process["cache"], d, opts)
        assert worst_loss_gap(again, got[2:], f"bf16 resume world {world}") < LOSS_TOL


def test_auto_dtype_is_bf16_where_zero1_shares_the_masters():
    """auto: the report's policy at dp >= 2; FP32 at dp = 1 (masters would cost 14 bytes a
    parameter against FP32's 12) and under engine=deepspeed; explicit choices are kept."""
    from k2_hw_h800.options import H800Options, resolve_dtype
    from pydantic import ValidationError

    assert [resolve_dtype(H800Options(), dp) for dp in (1, 2, 8)] == ["fp32", "bf16", "bf16"]
    assert resolve_dtype(H800Options(dtype="bf16"), 1) == "bf16"
    assert resolve_dtype(H800Options(dtype="fp32"), 8) == "fp32"
    assert resolve_dtype(H800Options(engine="deepspeed"), 8) == "fp32"
    with pytest.raises(ValidationError, match="engine=deepspeed holds FP32 weights"):
        H800Options(engine="deepspeed", dtype="bf16")
