"""Shared by the h800 backend tests: in-process reference runs and spawned gloo layouts, and
tie-free routing for every test that compares MoE training across layouts.

Tie-free routing: top-k routing is discrete, so a near-tie between the k-th and (k+1)-th
expert's selection score lets a float difference between two CPU kernels (AVX2 vs AVX-512 vs
AMX, or another reduction order across ranks) send a token to another expert, and the runs then
differ by far more than float error (issue 15: a 5.6% gap in one layer's Adam moment on an AMX
machine). A layout-equivalence test therefore sets each MoE layer's selection bias
(`e_score_correction_bias`, used for the choice only) to `ROUTING_GAP` on k experts of that
layer and 0 on the others: sigmoid scores lie in (0, 1), so the chosen experts' selection
scores exceed every other's by more than `ROUTING_GAP - 1 - 2 * steps * bias_update_speed`,
whatever the weights and inputs. The experts differ per layer and span the expert-parallel
shards, so every rank's experts and the all-to-all in both directions are exercised; the gate
weights (from the unbiased scores), the router's gradient and the bias update still run. What
it gives up: tokens of a layer no longer pick different experts, so uneven all-to-all splits
and the job-wide expert load are checked by test_expert_parallel (a skewed bias, its own
margin checked) rather than here. `RoutingMargin` records the smallest relative top-k margin
seen over a run and fails loudly if a future change brings near-ties back."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from small_model import small_model  # noqa: F401  (the backend tests' model: tests/small_model.py)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_env(cache: str) -> None:
    """Process-wide settings of a run (tests/hw/conftest.py restores them after a module)."""
    os.environ.update(
        K2_CACHE_DIR=cache, K2_LOAD_PLUGINS="optim,moe,data,hw_h800", OMP_NUM_THREADS="1"
    )
    torch.set_num_threads(1)


# selection bias of the favoured experts: margin > GAP - 1 (sigmoid scores are in (0, 1))
ROUTING_GAP = 2.0
# smallest allowed (k-th - (k+1)-th selection score) / largest selection score of a token:
# float kernels differ by ~1e-6 relative in the router logits, so 1e-3 is far from any flip
MIN_RELATIVE_MARGIN = 1e-3


def favoured_experts(layer_idx: int, n_experts: int, k: int) -> list[int]:
    """The k experts layer `layer_idx` routes every token to: a stride of n/k + 1 from 2 *
    layer, so they fall in different expert-parallel shards and change from layer to layer."""
    out: list[int] = []
    e = 2 * layer_idx
    for _ in range(k):
        while e % n_experts in out:
            e += 1
        out.append(e % n_experts)
        e += n_experts // k + 1
    return out


def fix_routing(model: torch.nn.Module) -> int:
    """Set every materialised MoE layer's selection bias for tie-free routing (see the module
    docstring); the number of layers set. Call on a fresh model, not on a resumed one (its
    checkpoint holds the bias the run reached)."""
    from k2_moe.moe import MoE

    done = 0
    for m in model.modules():
        if not isinstance(m, MoE) or m.gate.e_score_correction_bias.is_meta:
            continue
        bias = m.gate.e_score_correction_bias
        with torch.no_grad():
            bias.zero_()
            bias[favoured_experts(m.layer_idx, bias.numel(), m.gate.top_k)] = ROUTING_GAP
        done += 1
    return done


class RoutingMargin:
    """Forward hooks on every router of `model`: the smallest relative top-k margin, i.e.
    (k-th - (k+1)-th selection score) / largest selection score, over every token routed."""

    def __init__(self, model: torch.nn.Module):
        from k2_moe.router import SigmoidRouter

        self.min = float("inf")
        self.tokens = 0
        # only the routers this process holds (another pipeline stage's stay on `meta`)
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, SigmoidRouter) and not m.weight.is_meta
        ]

    def _hook(self, router, args, out) -> None:
        _, _, scores = out
        choice = scores.detach().float()
        if router.topk_method != "greedy":
            choice = choice + router.e_score_correction_bias
            if router.n_group > 1 and router.topk_group < router.n_group:
                raise NotImplementedError("RoutingMargin: group-limited routing")
        if choice.shape[-1] <= router.top_k or choice.shape[0] == 0:
            return
        top = choice.topk(router.top_k + 1, dim=-1).values
        rel = (top[:, -2] - top[:, -1]) / top[:, 0].abs().clamp_min(1e-30)
        self.min = min(self.min, float(rel.min()))
        self.tokens += choice.shape[0]

    def check(self, what: str = "") -> float:
        """Assert routing stayed tie-free over everything seen; the minimum margin."""
        for h in self.handles:
            h.remove()
        assert self.tokens > 0 or not self.handles, f"{what}: no token was routed"
        assert self.min > MIN_RELATIVE_MARGIN, (
            f"{what}: a near-tie in top-k routing (relative margin {self.min:.3g} <= "
            f"{MIN_RELATIVE_MARGIN}): float kernel differences may re-route tokens and the "
            "layouts then differ by more than float error; see backend_runs.fix_routing"
        )
        if os.environ.get("K2_TEST_PRINT_MARGIN"):
            print(
                f"routing margin {what}: min relative {self.min:.4f} over {self.tokens} tokens",
                flush=True,
            )
        return self.min


def build_tie_free(overrides: list[str]):
    """`build_run` of the `tiny` preset with tie-free routing (unless it resumed from a
    checkpoint); the run and its `RoutingMargin`."""
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run

    run = build_run(load_config("tiny", overrides))
    if run.step == 0:
        fix_routing(run.model)
    return run, RoutingMargin(run.model)


def train_losses(shrink: list[str], overrides: list[str]) -> list[float]:
    """Train the shrunk `tiny` preset in this process with tie-free routing (checked); the
    logged losses."""
    from k2_core.orchestrator import train

    run, margin = build_tie_free([*shrink, *overrides])
    train(run)
    margin.check(f"rank {os.environ.get('RANK', 'single')}")
    return [h["train/loss"] for h in run.history]


def _worker(
    rank: int, world: int, port: int, cache: str, shrink: list[str], overrides: list[str], out: str
) -> None:
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
        # the fp32 policy: these runs are compared with the fp32 `single` backend (the bf16
        # default is compared with itself in test_bf16_policy.py)
        losses = train_losses(
            shrink, ["parallel.backend=h800", "parallel.options.dtype=fp32", *overrides]
        )
        with open(f"{out}.{rank}", "w") as f:
            json.dump(losses, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def distributed_losses(
    world: int, cache: str, shrink: list[str], overrides: list[str], out: str
) -> list[list[float]]:
    """Train under the h800 backend on `world` spawned gloo processes; each rank's losses."""
    mp.spawn(
        _worker, args=(world, free_port(), cache, shrink, overrides, out), nprocs=world, join=True
    )
    per_rank = []
    for r in range(world):
        with open(f"{out}.{r}") as f:
            per_rank.append(json.load(f))
    return per_rank


def checkpoint_gaps(a_uri: str, b_uri: str) -> dict[str, tuple[float, str]]:
    """Two checkpoints of the same model in any layouts: same tensors and shapes (asserted);
    per kind of tensor (`model`, `bias` for the router selection bias, `optim.<state>` such as
    `optim.exp_avg`) the worst relative L2 difference ||a - b|| / ||a|| and where it is."""
    from k2_core.checkpoint import load_tensors

    a, _ = load_tensors(a_uri)
    b, _ = load_tensors(b_uri)
    worst: dict[str, tuple[float, str]] = {}
    for group in ("model", "optim"):
        assert a[group].keys() == b[group].keys(), group
        for k in a[group]:
            x, y = a[group][k].float(), b[group][k].float()
            assert x.shape == y.shape, k
            if group == "model":
                kind = "bias" if "e_score_correction_bias" in k else "model"
            else:
                kind = f"optim.{k.rsplit('.', 1)[-1]}"
            rel = float((x - y).norm() / x.norm().clamp_min(1e-12))
            if rel >= worst.get(kind, (-1.0, ""))[0]:
                worst[kind] = (rel, k)
    if os.environ.get("K2_TEST_PRINT_MARGIN"):
        print(
            "checkpoint gaps:",
            {k: (f"{r:.2e}", n) for k, (r, n) in sorted(worst.items())},
            flush=True,
        )
    return worst


# What a layout may change in a run with tie-free routing and fp32 Newton-Schulz
# (`EXACT_NS`): only the order of float reductions (gradient all-reduce across ranks, micro-
# batches, expert batching, pipeline stages), i.e. every step's gradient to a few fp32 ulps
# (u = 6e-8; a reordered sum of N terms moves by <~ sqrt(N) u of the sum of |terms|, measured
# ~3e-7 of the gradient norm). Measured on an AVX-512 AMD EPYC, default kernels and under
# ATEN_CPU_CAPABILITY=avx2 (worst over test_backend_train and test_backend_pipeline, 10
# steps): losses 9.5e-7 absolute (1 ulp at ~10), weights 3.0e-6 (embeddings, pp2_vs2),
# exp_avg 4.6e-7, exp_avg_sq 7.1e-7, Muon momentum 3.5e-7 relative. Bounds are 10-30x that,
# so another CPU's kernels (other blocking, FMA or not) fit, while one re-routed token or one
# wrong shard (>= 1e-3; issue 15's near-tie gave 5.6e-2) does not.
LOSS_TOL = 5e-5  # absolute, losses ~9-10: a few ulps of the loss accumulated over the steps
LAYOUT_BOUNDS = {  # relative L2 difference to the single-process checkpoint, per kind
    # Adam's m (exp_avg) and Muon's momentum are linear in the gradients: their ulp-level
    # difference, plus the feedback of slightly different weights on later gradients
    "optim.exp_avg": 1e-5,
    "optim.momentum_buffer": 1e-5,
    # v (exp_avg_sq) is quadratic in the gradients: twice the relative difference of m
    "optim.exp_avg_sq": 2e-5,
    # weights: the sum of the updates; Adam's m / sqrt(v) adds the two relative differences
    # and fp32 Newton-Schulz (5 quintic iterations) amplifies its input's a few times
    "model": 3e-5,
    "optim.master": 3e-5,
    # the bias moves by +-bias_update_speed a step from the sign of integer expert counts,
    # which tie-free routing makes equal in every layout, and the step counters are
    # integers: both exact
    "bias": 0.0,
    "optim.step": 0.0,
}
# bf16 Newton-Schulz rounds its iterates to 2^-9: a reduction-order difference flips
# roundings (and AMX / AVX512-BF16 / AVX2 round bf16 GEMMs differently), which moved the
# weights by 5e-3 and the moments by 2e-3 relative in 10 steps even with tie-free routing,
# enough to hide a real layout bug under float noise; the layout tests orthogonalise in fp32
# (Newton-Schulz is per matrix, the same code in every layout; tests/optim cover bf16)
EXACT_NS = ["optim.options.ns_dtype=float32"]


def worst_loss_gap(got: list[float], want: list[float], what: str = "") -> float:
    """Largest absolute difference of two loss curves of the same length."""
    assert len(got) == len(want), (got, want)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    if os.environ.get("K2_TEST_PRINT_MARGIN"):
        print(f"loss gap {what}: {worst:.2e}", flush=True)
    return worst


def assert_layout_equal(single_uri: str, other_uri: str) -> None:
    """The checkpoint of another layout holds the single-process run's tensors within
    `LAYOUT_BOUNDS` (see there)."""
    for kind, (rel, where) in checkpoint_gaps(single_uri, other_uri).items():
        assert rel <= LAYOUT_BOUNDS[kind], (kind, where, rel)
