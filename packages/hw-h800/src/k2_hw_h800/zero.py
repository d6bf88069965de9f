"""Data-parallel gradient reduction, global grad-norm clipping and the ZeRO-1 optimizer.

Under a (pp, dp, ep) layout the dense parameters of a stage are replicated over its dp x ep
"data" ranks, while each expert shard is replicated over dp only (its gradient already sums
the contributions of every EP rank's tokens through the all-to-all backward). Both are
divided by dp * ep, so the result is the gradient of the mean of the data ranks' losses —
the single-process gradient of the global batch.

ZeRO-1 (engine `k2`) is the optimizer's own `zero1(...)` (k2-optim: DistributedMuonClip),
reached through the optimizer so hw-h800 never imports k2_optim. Per pipeline stage, the state
of the dense parameters is split over the stage's data group (dp x ep ranks) and that of the
routed experts (EP_ATTR) over the dp group, by dim-0 rows: a Muon matrix whole on one rank
(Muon orthogonalises it whole), a 3-D expert stack between whole experts, an AdamW tensor
(embedding, head, router, norms) between rows, balanced so that per-rank optimizer bytes stay
within 10% of the stage mean (the memory planner's figure). Owners update their rows, which
are then all-gathered. QK-Clip sees the max logits reduced (MAX) over all data ranks of the
stage.

With engine `deepspeed` the optimizer's own `deepspeed(group)` (k2-optim: DeepSpeedMuonClip)
builds a DeepSpeed ZeRO-1 engine: DeepSpeed holds the partitioned fp32 master weights and
AdamW state and all-gathers the weights; K2 computes the Muon update of the matrices in this
rank's partition and QK-Clip. Gradients are still averaged and clipped here first (DeepSpeed's
own clip would act on the orthogonalised Muon updates).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from k2_core.errors import ConfigError
from k2_core.precision import grad_of
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .expert_parallel import EP_ATTR
from .mesh import Layout


def _all_reduce_flat(grads: list[torch.Tensor], group: Any, scale: float) -> None:
    """Sum `grads` over `group` with one flat all-reduce per dtype/device, then scale."""
    buckets: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        buckets[(g.dtype, g.device)].append(g)
    for gs in buckets.values():
        flat = _flatten_dense_tensors(gs)
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        torch._foreach_copy_(gs, list(_unflatten_dense_tensors(flat, gs)))


def _grads(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dense, expert) gradients: FP32 `main_grad` buffers under BF16 weights, else `.grad`."""
    dense, expert = [], []
    for p in model.parameters():
        g = grad_of(p)
        if g is not None:
            (expert if getattr(p, EP_ATTR, False) else dense).append(g)
    return dense, expert


@torch.no_grad()
def reduce_gradients(model: nn.Module, layout: Layout) -> None:
    """Average gradients over the data ranks (dense: dp x ep group; experts: dp group)."""
    if layout.data_size == 1:
        return
    dense, expert = _grads(model)
    scale = 1.0 / layout.data_size
    if dense:
        _all_reduce_flat(dense, layout.data_group, scale)
    if expert:
        if layout.dp > 1:
            _all_reduce_flat(expert, layout.dp_group, scale)
        else:
            torch._foreach_mul_(expert, scale)


@torch.no_grad()
def clip_global_grad_norm(model: nn.Module, layout: Layout, max_norm: float) -> torch.Tensor:
    """The L2 norm of the whole model's (reduced) gradient, over all shards; clip to max_norm."""
    dense, expert = _grads(model)
    dev = (dense or expert)[0].device if (dense or expert) else torch.device("cpu")

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        if not gs:
            return torch.zeros((), device=dev)
        return torch.stack([n.float() for n in torch._foreach_norm(gs)]).square().sum()

    # expert shards differ over ep; dense ones are identical there, so count them once
    total = sq(expert)
    if layout.ep > 1:
        dist.all_reduce(total, group=layout.ep_group)
    total = total + sq(dense)
    if layout.pp > 1:
        dist.all_reduce(total, group=layout.pp_group)
    norm = total.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = dense + expert
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def _max_over(group: Any):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t

    return reduce


def make_zero1_optimizer(
    model: nn.Module,
    optimizer: Any,
    layout: Layout,
    zero_stage: int,
    *,
    row_align: Callable[[torch.Tensor], int] | None = None,
    stage_params: Iterable[torch.Tensor] | None = None,
) -> Any:
    """Re-home `optimizer` (a k2 Muon / MuonClip) on the layout: ZeRO-1 when asked, dense
    state over the data group (dp x ep), expert state over the dp group.

    Gradients are reduced by the backend before `step()` (`reduce_grads=False`); QK-Clip
    reduces max logits over the data ranks. The param groups (and their hyperparameters,
    possibly set by an lr schedule already) carry over unchanged, in the same order, so
    optimizer state dicts keep single-process parameter indices. `row_align(p)` puts the
    row splits on a checkpoint chunk grid; `stage_params` (this rank's pipeline stage, default
    every parameter) is what gets state and balance.
    """
    reduce = _max_over(layout.data_group)
    if zero_stage == 0:
        if hasattr(optimizer, "qk_clip_targets"):
            optimizer.max_logit_reduce = reduce
        return optimizer
    if not hasattr(optimizer, "zero1"):  # k2-optim's Muon/MuonClip shard themselves
        raise ConfigError(
            "parallel.options.zero_stage=1 supports optimizers with a zero1() "
            "method (k2-optim's muon/muonclip); set zero_stage=0 for others"
        )
    return optimizer.zero1(
        layout.data_group,
        expert_group=layout.dp_group,
        is_expert=_is_expert,
        row_align=row_align,
        stage_params=stage_params,
        reduce_grads=False,
        max_logit_reduce=reduce,
    )


def _is_expert(p: torch.Tensor) -> bool:
    """Whether `p` holds only this rank's E/ep experts (replicated over dp, not ep)."""
    return bool(getattr(p, EP_ATTR, False))


def check_deepspeed_layout(options: Any) -> None:
    """engine=deepspeed: data parallelism only (DeepSpeed's ZeRO group is the whole job)."""
    if options.pp > 1 or options.ep > 1:
        raise ConfigError(
            f"parallel.options.engine=deepspeed supports data parallelism only "
            f"(pp=1, ep=1), got pp={options.pp}, ep={options.ep}; use engine=k2 "
            "for pipeline or expert parallelism"
        )
    if options.zero_stage != 1:
        raise ConfigError(
            "parallel.options.engine=deepspeed runs ZeRO stage 1; set zero_stage=1 "
            "(or engine=k2 for zero_stage=0)"
        )


def make_deepspeed_optimizer(model: nn.Module, optimizer: Any, layout: Layout) -> Any:
    """`optimizer` (a k2 Muon / MuonClip) as K2's MuonClip inside a DeepSpeed ZeRO-1 engine
    over the dp group, reached through `optimizer.deepspeed()` (k2-optim's
    DeepSpeedMuonClip). The backend still averages and clips the gradients (fp32) before
    `step()`; QK-Clip reduces max logits over the data ranks."""
    if not hasattr(optimizer, "deepspeed"):
        raise ConfigError(
            "parallel.options.engine=deepspeed supports optimizers with a "
            "deepspeed() method (k2-optim's muon/muonclip); use engine=k2"
        )
    opt = optimizer.deepspeed(layout.dp_group, max_logit_reduce=_max_over(layout.data_group))
    opt.initialize(model, {"zero_optimization": {"stage": 1}})
    return opt
