"""Expert parallelism applied from outside the model: shard each MoE layer's experts over the
EP group and exchange tokens with two uneven all-to-alls.

A MoE layer is recognised by duck typing (k2_core's `LoadBalanced` plus `gate`, `experts` with
3-D `gate_up_proj` / `down_proj`, `n_experts`, `expert_counts`), so hw-h800 never imports
k2_moe. After `shard_experts(moe, ep_rank, ep_size, group)` the layer keeps experts
`[ep_rank * E/ep, (ep_rank + 1) * E/ep)` and its forward becomes:

1. route every local token with the (replicated) router; count the load over all E experts;
2. sort the (token, k) pairs by expert with one argsort: pairs for rank r are then one
   contiguous slice, ordered by expert;
3. all-to-all the pair counts, then the rows (and their local expert ids), uneven splits;
4. run the local experts on the received rows (the experts module's own grouped kernel);
5. all-to-all the outputs back, weight them by the router weights and index-add per token;
   add the shared expert.
The all-to-alls are autograd functions whose backward is the reverse exchange.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from k2_core.errors import ConfigError
from k2_core.model.init import EXPERT_OFFSET_ATTR, GLOBAL_ROWS_ATTR
from k2_core.model.protocols import LoadBalanced
from k2_core.precision import host_counts
from torch import nn

EP_ATTR = "_k2_ep_sharded"  # set on expert parameters that hold only this rank's E/ep experts


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `in_splits` go to each rank; rows arrive split by `out_splits`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> torch.Tensor:
    """Differentiable uneven all_to_all_single over `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def is_moe_layer(m: nn.Module) -> bool:
    """Whether `m` looks like a k2 MoE FFN that expert parallelism can shard."""
    ex = getattr(m, "experts", None)
    return (
        isinstance(m, LoadBalanced)
        and hasattr(m, "gate")
        and hasattr(m, "n_experts")
        and isinstance(getattr(m, "expert_counts", None), torch.Tensor)
        and isinstance(getattr(ex, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(ex, "down_proj", None), torch.Tensor)
    )


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every MoE layer of `model`, in order."""
    return [(n, m) for n, m in model.named_modules() if is_moe_layer(m)]


def _balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, n_seq: int, alpha: float
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (the same formula as the MoE layer's own)."""
    n, e = scores.shape
    k, t = topk_idx.shape[1], n // n_seq
    with torch.no_grad():
        f = torch.zeros(n_seq, e, dtype=scores.dtype, device=scores.device)
        f.scatter_add_(
            1,
            topk_idx.reshape(n_seq, t * k),
            torch.ones(n_seq, t * k, dtype=scores.dtype, device=scores.device),
        )
        f.mul_(e / (k * t))
    p = (scores / scores.sum(dim=-1, keepdim=True)).view(n_seq, t, e).mean(dim=1)
    return alpha * (f * p).sum(dim=1).mean()


def _ep_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The expert-parallel forward installed on a sharded MoE layer (see the module doc)."""
    ep = self._k2_ep
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    topk_idx, topk_weight, scores = self.gate(flat)
    n_tok, k = topk_idx.shape
    pair_expert = topk_idx.reshape(-1)
    counts = torch.zeros(self.n_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, pair_expert, torch.ones_like(pair_expert))
    if self.training:
        with torch.no_grad():
            self.expert_counts.add_(counts)
    coef = getattr(self, "seq_aux_loss_coef", 0.0)
    if coef > 0:
        self.aux_loss = _balance_loss(scores, topk_idx, shape[0] if len(shape) == 3 else 1, coef)
    else:
        self.aux_loss = None
    # one argsort by expert: each destination rank's pairs form one contiguous slice
    perm = torch.argsort(pair_expert, stable=True)
    token = torch.div(perm, k, rounding_mode="floor")
    send_counts = counts.view(ep["size"], ep["local"]).sum(dim=1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep["group"])
    pairs = pair_expert.numel()  # the host syncs (uniform splits on meta: a dry run)
    in_splits, out_splits = host_counts(send_counts, pairs), host_counts(recv_counts, pairs)
    local_id = pair_expert.index_select(0, perm) % ep["local"]
    recv_x = all_to_all(flat.index_select(0, token), out_splits, in_splits, ep["group"])
    recv_e = torch.empty(sum(out_splits), dtype=local_id.dtype, device=local_id.device)
    dist.all_to_all_single(recv_e, local_id, out_splits, in_splits, group=ep["group"])
    ones = torch.ones(recv_e.shape[0], 1, dtype=topk_weight.dtype, device=recv_e.device)
    recv_y = self.experts(recv_x, recv_e.unsqueeze(1), ones)
    back = all_to_all(recv_y, in_splits, out_splits, ep["group"])
    w = topk_weight.reshape(-1).index_select(0, perm).unsqueeze(1).to(back.dtype)
    out = torch.zeros(n_tok, shape[-1], dtype=back.dtype, device=back.device)
    out = out.index_add(0, token, back * w)
    if getattr(self, "shared_experts", None) is not None:
        out = out + self.shared_experts(flat).to(out.dtype)
    return out.view(shape).to(x.dtype)


@torch.no_grad()
def shard_experts(moe: nn.Module, ep_rank: int, ep_size: int, group: Any) -> None:
    """Keep this rank's E/ep experts of `moe` and install the expert-parallel forward."""
    n = moe.n_experts
    if n % ep_size:
        raise ConfigError(f"parallel.options.ep={ep_size} must divide moe.n_routed_experts={n}")
    local = n // ep_size
    lo = ep_rank * local
    ex = moe.experts
    for name in ("gate_up_proj", "down_proj"):
        old = getattr(ex, name)
        new = nn.Parameter(old.detach()[lo : lo + local].clone(), requires_grad=old.requires_grad)
        for attr, val in vars(old).items():  # e.g. muon_split
            setattr(new, attr, val)
        setattr(new, EP_ATTR, True)
        setattr(
            new, EXPERT_OFFSET_ATTR, lo
        )  # layout-free init draws experts lo.. as one process would
        setattr(new, GLOBAL_ROWS_ATTR, n)  # checkpoints hold every expert
        setattr(ex, name, new)
    if hasattr(ex, "n_experts"):
        ex.n_experts = local
    moe._k2_ep = {"rank": ep_rank, "size": ep_size, "local": local, "offset": lo, "group": group}
    moe.forward = types.MethodType(_ep_forward, moe)


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int, group: Any) -> int:
    """Shard every MoE layer of `model` over the EP group; returns how many were sharded."""
    layers = moe_layers(model)
    for _, m in layers:
        shard_experts(m, ep_rank, ep_size, group)
    return len(layers)


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the parameters that hold only this rank's experts."""
    return {n for n, p in model.named_parameters() if getattr(p, EP_ATTR, False)}
