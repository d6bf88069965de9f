"""ZeRO-1-style MuonClip over a torch.distributed process group.

Every rank holds the full model (replicated parameters) but optimizer state only for the
parameters it owns. Whole tensors are assigned to ranks (greedy, largest first, balanced by
element count), so each owned matrix is orthogonalised entirely on its owner — Muon needs the
whole matrix, unlike element-wise AdamW sharding.

step():
1. gradients are averaged over the group by the optimizer (one all-reduce per dtype over a
   flat buffer) unless `reduce_grads=False` (the caller, e.g. DDP, already did it);
2. each rank updates its owned parameters (Muon batched NS / AdamW foreach);
3. each owner broadcasts its updated parameters (one flat broadcast per rank and dtype);
4. QK-Clip runs on every replica with max logits all-reduced (MAX) over the group, so the
   replicas stay identical.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .muon import Muon
from .qkclip import MuonClip


def assign_owners(numels: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: greedy longest-processing-time, deterministic on every rank."""
    load = [0] * world_size
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += numels[i]
    return owners


def merge_state_dicts(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank `DistributedMuonClip.state_dict()`s into one full state dict, loadable by
    a single-process MuonClip or by a DistributedMuonClip of any world size."""
    full = {"state": {}, "param_groups": shards[0]["param_groups"]}
    for sd in shards:
        full["state"].update(sd["state"])
    return full


class DistributedMuonClip(MuonClip):
    """MuonClip with optimizer state sharded by whole tensors over `process_group`.

    Same arguments as MuonClip plus `process_group` (default: the world) and `reduce_grads`
    (True: the optimizer all-reduces (averages) gradients first; False: they are averaged
    already). `max_logit_reduce` defaults to an all-reduce MAX over the group.
    `state_dict()` holds this rank's state plus `owners` (param index -> rank) and
    `world_size`; `merge_state_dicts` / `consolidated_state_dict()` rebuild the full one,
    and `load_state_dict` accepts a full or same-layout sharded dict (re-sharding: load the
    merged full dict with any world size).
    """

    def __init__(self, params: Any, *args: Any, process_group: Any = None,
                 reduce_grads: bool = True, **kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedMuonClip needs an initialised torch.distributed group")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.reduce_grads = reduce_grads
        if kwargs.get("max_logit_reduce") is None:
            kwargs["max_logit_reduce"] = self._all_reduce_max
        super().__init__(params, *args, **kwargs)
        flat = [p for g in self.param_groups for p in g["params"]]
        self.owners = assign_owners([p.numel() for p in flat], self.world_size)
        self._owner_of = {id(p): r for p, r in zip(flat, self.owners, strict=True)}

    def _all_reduce_max(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return t

    def _owned(self, p: Tensor) -> bool:
        return self._owner_of[id(p)] == self.rank

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def _before_update(self) -> None:
        if not self.reduce_grads or self.world_size == 1:
            return
        by_dtype: dict[Any, list[Tensor]] = defaultdict(list)
        for p in self._all_params():
            if p.grad is not None:
                by_dtype[(p.grad.dtype, p.grad.device)].append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)
            torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))

    @torch.no_grad()
    def _after_update(self) -> None:
        if self.world_size > 1:
            buckets: dict[Any, list[Tensor]] = defaultdict(list)
            for p in self._all_params():
                if p.grad is not None:
                    buckets[(self._owner_of[id(p)], p.dtype, p.device)].append(p)
            for (owner, _dt, _dev), ps in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
                flat = _flatten_dense_tensors(ps) if owner == self.rank else torch.empty(
                    sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
                dist.broadcast(flat, group_src=owner, group=self.process_group)
                if owner != self.rank:
                    torch._foreach_copy_(ps, list(_unflatten_dense_tensors(flat, ps)))
        self.apply_qk_clip()

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (state of owned parameters) + `owners` + `world_size`."""
        sd = super().state_dict()
        sd["owners"] = list(self.owners)
        sd["world_size"] = self.world_size
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full (merged / single-process) or sharded state dict; keep owned state only."""
        sd = {k: v for k, v in state_dict.items() if k in ("state", "param_groups")}
        super().load_state_dict(sd)
        for p in self._all_params():
            if not self._owned(p):
                self.state.pop(p, None)

    def consolidated_state_dict(self) -> dict[str, Any]:
        """Collective: the full state dict (every rank's shard merged), on every rank."""
        local = super().state_dict()
        local = {"state": {k: {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
                           for k, s in local["state"].items()},
                 "param_groups": local["param_groups"]}
        shards: list[Any] = [None] * self.world_size
        dist.all_gather_object(shards, local, group=self.process_group)
        return merge_state_dicts(shards)


def rehome_arguments(optimizer: Muon) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(param groups, keyword arguments) that rebuild `optimizer` (a Muon or MuonClip) as another
    MuonClip class with the same settings; a MuonClip's max-logit hooks are handed over."""
    d = optimizer.defaults
    kwargs: dict[str, Any] = dict(
        lr=d["lr"], weight_decay=d["weight_decay"],
        momentum=d["momentum"], nesterov=d["nesterov"], ns_steps=d["ns_steps"],
        ns_coefficients=d["ns_coefficients"], ns_eps=d["ns_eps"],
        adjust_lr_fn=d["adjust_lr_fn"], adamw_betas=d["betas"], adamw_eps=d["eps"],
        ns_dtype=optimizer.ns_dtype,
    )
    if isinstance(optimizer, MuonClip):
        kwargs.update(qk_clip=optimizer.qk_clip, qk_clip_tau=optimizer.qk_clip_tau,
                      qk_clip_targets=optimizer.qk_clip_targets,
                      accumulate_max_logits=bool(optimizer._hooks))
        optimizer.remove_hooks()  # the new optimizer installs its own
    else:
        kwargs.update(qk_clip=False, qk_clip_targets=[])
    return [dict(g) for g in optimizer.param_groups], kwargs


def to_zero1(optimizer: Muon, process_group: Any = None, *, reduce_grads: bool = True,
             max_logit_reduce: Any = None) -> DistributedMuonClip:
    """`optimizer` (a Muon or MuonClip) as a DistributedMuonClip with the same settings."""
    groups, kwargs = rehome_arguments(optimizer)
    return DistributedMuonClip(groups, process_group=process_group, reduce_grads=reduce_grads,
                               max_logit_reduce=max_logit_reduce, **kwargs)
