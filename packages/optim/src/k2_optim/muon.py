"""Muon (Moonlight / K2 variant) with built-in AdamW groups, all in one optimizer object.

Hot path: momentum, weight decay and parameter updates are `torch._foreach_*` ops over the
group; matrices of the same (rows, cols) are stacked into one [n, r, c] tensor and
orthogonalised together by `newton_schulz` (bmm/baddbmm). 3-D expert tensors [E, out, in]
count as E matrices; a parameter with attribute `muon_split = s` is s equal row blocks
(dim -2) orthogonalised separately.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .grouping import param_groups as _auto_groups
from .orthogonalize import NS_COEFFICIENTS, NS_EPS, NS_STEPS, newton_schulz

ADJUST_LR_FNS = ("match_rms_adamw", "original", "none")


def matrix_view_shape(p: Tensor) -> tuple[int, int, int]:
    """(n, rows, cols): how Muon sees `p` as a stack of n matrices.

    2-D [r, c] -> 1 matrix; 3-D [E, r, c] -> E matrices (experts); >= 4-D (convs) -> one
    [shape[0], prod(rest)] matrix. `muon_split = s` (2-D/3-D only) splits rows into s blocks.
    """
    s = int(getattr(p, "muon_split", 1) or 1)
    if p.ndim == 2:
        n, r, c = 1, p.shape[0], p.shape[1]
    elif p.ndim == 3:
        n, r, c = p.shape[0], p.shape[1], p.shape[2]
    elif p.ndim >= 4:
        return 1, p.shape[0], p.numel() // p.shape[0]
    else:
        raise ValueError(f"Muon needs parameters with ndim >= 2, got shape {tuple(p.shape)}")
    if r % s:
        raise ValueError(f"muon_split={s} does not divide the {r} rows of shape {tuple(p.shape)}")
    return n * s, r // s, c


def adjusted_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Update scale of one [rows, cols] matrix: 0.2*sqrt(max(rows, cols)) for match_rms_adamw."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn in (None, "none"):
        return 1.0
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def _split_by_ndim(group: dict[str, Any]) -> list[dict[str, Any]]:
    params = list(group["params"])
    mats = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    out = []
    if mats:
        out.append({**group, "params": mats, "use_muon": True})
    if rest:
        out.append({**group, "params": rest, "use_muon": False})
    return out


class Muon(torch.optim.Optimizer):
    """Muon for matrices plus AdamW for everything else, in one `step()`.

    `params` may be:
    - an `nn.Module`: groups come from `k2_optim.param_groups` (embeddings, head, router
      weight and 1-D parameters on AdamW);
    - an iterable of tensors: ndim >= 2 -> Muon, the rest -> AdamW;
    - param-group dicts; `use_muon` (bool) says which update a group gets (absent: split by
      ndim as above).

    Muon update per matrix W (K2 Algorithm 1): M = mu*M + G; U = G + mu*M (Nesterov) or M;
    O = NS5(U) in bf16; W -= lr*wd*W; W -= lr * 0.2*sqrt(max(rows, cols)) * O.
    AdamW groups default to `adamw_lr` (else lr) and `adamw_weight_decay` (else weight_decay).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        adjust_lr_fn: str | None = "match_rms_adamw",
        *,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError("lr, weight_decay and momentum must be >= 0")
        adjusted_scale(1, 1, adjust_lr_fn)  # validates the name
        if isinstance(params, nn.Module):
            groups = _auto_groups(params, lr, weight_decay, adamw_lr, adamw_weight_decay)
        else:
            items = list(params)
            if items and isinstance(items[0], dict):
                groups = []
                for g in items:
                    groups.extend([g] if "use_muon" in g else _split_by_ndim(g))
            else:
                groups = _split_by_ndim({"params": items})
        a_lr = lr if adamw_lr is None else adamw_lr
        a_wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        fixed = []
        for g in groups:
            g = dict(g)
            if not g["use_muon"]:
                g.setdefault("lr", a_lr)
                g.setdefault("weight_decay", a_wd)
            fixed.append(g)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), ns_eps=ns_eps,
            adjust_lr_fn=adjust_lr_fn, betas=tuple(adamw_betas), eps=adamw_eps, use_muon=True,
        )
        self.ns_dtype = ns_dtype
        super().__init__(fixed, defaults)
        for g in self.param_groups:
            if g["use_muon"]:
                for p in g["params"]:
                    matrix_view_shape(p)  # validates ndim / muon_split

    # --- hooks for subclasses ------------------------------------------------------------
    def _owned(self, p: Tensor) -> bool:
        """Whether this process updates `p` (always, except in DistributedMuonClip)."""
        return True

    def zero1(self, process_group: Any = None, *, reduce_grads: bool = True,
              max_logit_reduce: Any = None) -> torch.optim.Optimizer:
        """This optimizer re-homed as a ZeRO-1 `DistributedMuonClip` over `process_group`.

        Param groups (with hyperparameters an lr schedule may already have set) carry over in
        order, so state dicts keep single-process parameter indices; QK-Clip settings and
        targets move over too. A backend calls this without importing k2_optim.
        """
        from .distributed import to_zero1

        return to_zero1(self, process_group, reduce_grads=reduce_grads,
                        max_logit_reduce=max_logit_reduce)

    def deepspeed(self, process_group: Any = None, *,
                  max_logit_reduce: Any = None) -> torch.optim.Optimizer:
        """This optimizer as a `DeepSpeedMuonClip` (K2's update inside DeepSpeed ZeRO-1) over
        `process_group`; call `initialize(model, config)` on the result to build the engine.

        Same carry-over as `zero1()`; a backend calls this without importing k2_optim.
        """
        from .deepspeed_zero import to_deepspeed

        return to_deepspeed(self, process_group, max_logit_reduce=max_logit_reduce)

    def _before_update(self) -> None:
        """Runs first in step() (DistributedMuonClip: gradient all-reduce)."""

    def _after_update(self) -> None:
        """Runs after the updates (DistributedMuonClip: parameter broadcast; MuonClip: QK-Clip)."""

    # --- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon/AdamW update of every group, then `_after_update()` (QK-Clip in MuonClip)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_update()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and self._owned(p)]
            if not params:
                continue
            if group["use_muon"]:
                self._muon_update(group, params)
            else:
                self._adamw_update(group, params)
        self._after_update()
        return loss

    def _muon_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        directions = self._directions(group, params)
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)          # decoupled weight decay
        for idxs, outs, scale in directions:
            torch._foreach_add_([params[i] for i in idxs], outs, alpha=-lr * scale)

    def _directions(self, group: dict[str, Any], params: list[Tensor]
                    ) -> Iterator[tuple[list[int], list[Tensor], float]]:
        """Momentum (+ Nesterov), then one batched Newton-Schulz per matrix shape; yields per
        shape bucket (indices into `params`, orthogonalised updates shaped like them, scale)."""
        mu = group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)                       # M = mu*M + G
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs

        # bucket by matrix shape (and device/dtype): one batched NS per bucket
        buckets: dict[tuple, list[int]] = defaultdict(list)
        shapes = []
        for i, p in enumerate(params):
            n, r, c = matrix_view_shape(p)
            shapes.append(n)
            buckets[(r, c, p.device, p.dtype)].append(i)
        return self._orthogonalised(group, params, updates, shapes, buckets)

    def _orthogonalised(self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor],
                        shapes: list[int], buckets: dict[tuple, list[int]]
                        ) -> Iterator[tuple[list[int], list[Tensor], float]]:
        for (r, c, _dev, dtype), idxs in buckets.items():
            mats = [updates[i].reshape(shapes[i], r, c) for i in idxs]
            stacked = mats[0] if len(mats) == 1 else torch.cat(mats)
            o = newton_schulz(stacked, group["ns_steps"], group["ns_coefficients"], group["ns_eps"],
                              dtype=self.ns_dtype, out_dtype=dtype)
            outs = o.split([shapes[i] for i in idxs])
            yield idxs, [x.view(params[i].shape) for x, i in zip(outs, idxs, strict=True)], \
                adjusted_scale(r, c, group["adjust_lr_fn"])

    def _adamw_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        m, v, bc1, bc2 = [], [], [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = int(st["step"]) + 1
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            bc1.append(1.0 - b1 ** st["step"])
            bc2.append(math.sqrt(1.0 - b2 ** st["step"]))
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, [-lr / b for b in bc1])
