"""`parallel.options.engine=deepspeed`: K2's MuonClip inside a DeepSpeed ZeRO-1 engine on 2 gloo
processes trains the shrunk `tiny` model like the single-process MuonClip run on the same global
batch, applies the same QK-Clip on every rank (and in DeepSpeed's fp32 master partitions), and
resumes from its checkpoints (same layout, and in one process: they hold the single-process
layout).

Routing is tie-free by construction and checked (backend_runs.fix_routing, RoutingMargin) and
Newton-Schulz runs in fp32, so the runs differ in floating-point summation order (gradient
all-reduce, 2 micro-batches per rank instead of 4, batched Newton-Schulz buckets) and in one
rounding (the Muon update is scaled before, not with, the lr): every logged loss within
backend_runs.LOSS_TOL (absolute, losses ~9) of the single-process loss at the same step. A
same-layout resume replays the run it came from to 1e-5.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from backend_runs import (
    EXACT_NS,
    LOSS_TOL,
    build_tie_free,
    free_port,
    small_model,
    train_losses,
    use_env,
    worst_loss_gap,
)

STEPS, EVERY, TOL, RESUME_TOL = 10, 3, LOSS_TOL, 1e-5
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
DS = ["parallel.backend=h800", "parallel.options.engine=deepspeed", "train.grad_accum=2"]
SINGLE = ["train.grad_accum=4"]  # 4 sequences a step in both: 2 ranks x 2 micro-batches
TAU = 0.057  # max logits of this small model are 0.05-0.07: some heads clipped, some steps
ATTN = ("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight")


def _train(overrides: list[str]) -> dict:
    """Train in this process with tie-free routing (checked); losses, heads clipped per step
    and the attention weights."""
    from k2_core.orchestrator import train

    run, margin = build_tie_free([*SHRINK, *overrides])
    train(run)
    margin.check(f"deepspeed rank {os.environ.get('RANK', 'single')}")
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters() if n.endswith(ATTN)}
    master_gap = 0.0
    if getattr(run.optimizer, "engine", None) is not None:  # DeepSpeed's fp32 master copy
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(run.model.named_parameters())
        master_gap = max(
            float((safe_get_full_fp32_param(params[n]) - w).abs().max()) for n, w in weights.items()
        )
    return {
        "losses": [h["train/loss"] for h in run.history],
        "clipped": [h["qk_clip/heads_clipped"] for h in run.history],
        "weights": weights,
        "master_gap": master_gap,
    }


def _worker(rank: int, world: int, port: int, cache: str, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    use_env(cache)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        torch.save(_train([*DS, *overrides]), f"{out}.{rank}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _deepspeed(cache: str, overrides: list[str], tmp: Path) -> list[dict]:
    """The 2-rank engine=deepspeed run; each rank's result."""
    out = str(tmp / "result")
    mp.spawn(_worker, args=(2, free_port(), cache, overrides, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in range(2)]


def _close(got: list[float], want: list[float], tol: float) -> None:
    assert worst_loss_gap(got, want, f"deepspeed (tol {tol})") < tol, (got, want)


def _ckpt(d: Path, step: int) -> Path:
    return d / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    c = str(tmp_path_factory.mktemp("cache"))
    use_env(c)
    return c


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """The single-process MuonClip run (default tau) and its checkpoints."""
    d = tmp_path_factory.mktemp("single")
    use_env(cache)
    res = _train([*SINGLE, f"checkpoint.dir={d}"])
    assert len(res["losses"]) == STEPS and res["losses"][-1] < res["losses"][0]
    return {**res, "dir": d}


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, cache):
    """The 2-rank engine=deepspeed run (default tau) and its checkpoints."""
    d = tmp_path_factory.mktemp("deepspeed")
    return {"ranks": _deepspeed(cache, [f"checkpoint.dir={d}"], d), "dir": d}


@pytest.mark.slow
@pytest.mark.distributed
def test_losses_match_single_process(single, deepspeed_run):
    r0, r1 = deepspeed_run["ranks"]
    assert r0["losses"] == r1["losses"]  # every rank logs the global loss
    _close(r0["losses"], single["losses"], TOL)
    for n, w in r0["weights"].items():  # ZeRO-1's all-gather leaves every rank the same model
        assert torch.equal(w, r1["weights"][n]), n
    assert r0["master_gap"] == 0.0


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_replays_the_run(tmp_path, cache, single, deepspeed_run):
    """engine=deepspeed resumes its step-6 checkpoint (same layout) and gives the same next
    losses; the same checkpoint resumes in one process like the single-process run."""
    src = _ckpt(deepspeed_run["dir"], 2 * EVERY)
    d1 = tmp_path / "same_layout"
    shutil.copytree(src, _ckpt(d1, 2 * EVERY))
    got = _deepspeed(cache, [f"checkpoint.dir={d1}"], tmp_path)
    _close(got[0]["losses"], deepspeed_run["ranks"][0]["losses"][2 * EVERY :], RESUME_TOL)
    d2 = tmp_path / "one_process"
    shutil.copytree(src, _ckpt(d2, 2 * EVERY))
    use_env(cache)
    losses = train_losses(SHRINK, [*SINGLE, f"checkpoint.dir={d2}"])
    _close(losses, single["losses"][2 * EVERY :], TOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_qk_clip_same_on_every_rank_as_single_process(tmp_path, cache):
    """With a low tau some heads are clipped at some steps; both ranks clip as many heads as
    the single-process run at every step (max logits reduced over the job), end with identical
    attention weights, close to the single-process ones, and equal to DeepSpeed's fp32 master
    partitions."""
    # fp32 Newton-Schulz (SHRINK): without bf16 rounding flips the weights agree to fp32 precision
    tau = [f"optim.options.qk_clip_tau={TAU}", "checkpoint.every=1000"]
    use_env(cache)
    ref = _train([*SINGLE, *tau, f"checkpoint.dir={tmp_path / 'single'}"])
    r0, r1 = _deepspeed(cache, [*tau, f"checkpoint.dir={tmp_path / 'ds'}"], tmp_path)
    assert sum(ref["clipped"]) > 0
    assert r0["clipped"] == r1["clipped"] == ref["clipped"]
    _close(r0["losses"], ref["losses"], TOL)
    for n, w in ref["weights"].items():
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n
        rel = float((r0["weights"][n] - w).norm() / w.norm())
        assert rel < 1e-5, (n, rel)  # measured ~2e-7
    assert r0["master_gap"] == r1["master_gap"] == 0.0


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize(
    "opts,field", [({"pp": 2}, "pp=2"), ({"ep": 2}, "ep=2"), ({"zero_stage": 0}, "zero_stage=1")]
)
def test_deepspeed_refuses_other_layouts_in_one_line(world_of_one, opts, field):
    from k2_core.errors import ConfigError
    from k2_hw_h800.backend import H800Backend
    from k2_hw_h800.options import H800Options

    with pytest.raises(ConfigError, match="engine=deepspeed") as err:
        H800Backend(H800Options(engine="deepspeed", **opts))
    assert field in str(err.value) and "\n" not in str(err.value)
