"""Muon (Moonlight / K2 variant) with built-in AdamW groups, all in one optimizer object.

Hot path: momentum, weight decay and parameter updates are `torch._foreach_*` ops over the
group; matrices of the same (rows, cols) are stacked into one [n, r, c] tensor and
orthogonalised together by `newton_schulz` (bmm/baddbmm). 3-D expert tensors [E, out, in]
count as E matrices; a parameter with attribute `muon_split = s` is s equal row blocks
(dim -2) orthogonalised separately.

Mixed precision: a parameter's gradient is `p.main_grad` when that attribute exists (an FP32
accumulation buffer a trainer keeps beside BF16 weights, as Megatron's), else `p.grad`
(`grad_of`). Parameters held below FP32 get FP32 master weights in the optimizer state
(`master`, shaped like the rows the optimizer owns) when `master_weights` is on (the default):
momentum, moments and the update are FP32, and the BF16 weight is the master rounded after
each step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .grouping import param_groups as _auto_groups
from .orthogonalize import NS_COEFFICIENTS, NS_EPS, NS_STEPS, NSWorkspace, newton_schulz

ADJUST_LR_FNS = ("match_rms_adamw", "original", "none")
#: the most update bytes one Newton-Schulz batch stacks (its temporaries scale with it)
DEFAULT_BUCKET_BYTES = 64 << 20


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


def grad_of(p: Tensor) -> Tensor | None:
    """The gradient a step uses: `p.main_grad` (an FP32 accumulation buffer) if set, else
    `.grad`."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _dim0(p: Tensor) -> int:
    """Rows of `p` as ZeRO-1 owns them: dim 0 (a 0-D tensor is one row)."""
    return p.shape[0] if p.ndim else 1


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

    The step works in buckets of at most `bucket_bytes` (default 64 MiB) of same-shaped
    matrices (a 3-D stack is cut between buckets at whole experts): momentum, the stacked
    Nesterov update and Newton-Schulz exist for one bucket at a time, so the step's
    temporaries stay near a few buckets whatever the model size. They live in a workspace
    (`NSWorkspace`, about two buckets) that is reused bucket after bucket and kept between
    steps, so a step allocates nothing large: the stacked update is written once in its
    dtype, normalised straight into the NS dtype, iterated in its own layout and added to
    the weights from there. `free_workspace()` returns that memory (the next step re-creates it).
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
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        master_weights: bool = True,
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
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            ns_eps=ns_eps,
            adjust_lr_fn=adjust_lr_fn,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            use_muon=True,
        )
        self.ns_dtype = ns_dtype
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        # not a param-group default: state dicts written before it existed still load
        self.bucket_bytes = int(bucket_bytes)
        self.master_weights = bool(master_weights)
        self._workspace = NSWorkspace()
        super().__init__(fixed, defaults)
        for g in self.param_groups:
            if g["use_muon"]:
                for p in g["params"]:
                    matrix_view_shape(p)  # validates ndim / muon_split

    @property
    def workspace(self) -> NSWorkspace:
        """The step's reusable scratch memory (stacked updates and Newton-Schulz iterates)."""
        ws = getattr(self, "_workspace", None)
        if ws is None:
            ws = self._workspace = NSWorkspace()
        return ws

    def free_workspace(self) -> None:
        """Release the step's scratch memory now (it is allocated again by the next step)."""
        self.workspace.clear()

    # --- hooks for subclasses ------------------------------------------------------------
    def _owned(self, p: Tensor) -> bool:
        """Whether this process updates `p` (always, except in DistributedMuonClip)."""
        return True

    def zero1(
        self,
        process_group: Any = None,
        *,
        expert_group: Any = None,
        is_expert: Callable[[Tensor], bool] | None = None,
        row_align: Callable[[Tensor], int] | None = None,
        stage_params: Iterable[Tensor] | None = None,
        reduce_grads: bool = True,
        max_logit_reduce: Any = None,
    ) -> torch.optim.Optimizer:
        """This optimizer re-homed as a ZeRO-1 `DistributedMuonClip`: dense parameters' state
        split by rows over `process_group`, expert shards' (`is_expert`, default the
        `_k2_ep_sharded` attribute) over `expert_group`; see DistributedMuonClip.

        Param groups (with hyperparameters an lr schedule may already have set) carry over in
        order, so state dicts keep single-process parameter indices; QK-Clip settings and
        targets move over too. A backend calls this without importing k2_optim.
        """
        from .distributed import to_zero1

        return to_zero1(
            self,
            process_group,
            expert_group=expert_group,
            is_expert=is_expert,
            row_align=row_align,
            stage_params=stage_params,
            reduce_grads=reduce_grads,
            max_logit_reduce=max_logit_reduce,
        )

    def deepspeed(
        self, process_group: Any = None, *, max_logit_reduce: Any = None
    ) -> torch.optim.Optimizer:
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
    def owned_rows(self, p: Tensor) -> tuple[int, int] | None:
        """Dim-0 rows [start, stop) of `p` whose state this process holds and updates: all of
        them here; a row range or None in DistributedMuonClip."""
        return (0, _dim0(p)) if self._owned(p) else None

    def _rows_view(self, t: Tensor, p: Tensor) -> Tensor:
        """`t` (p, p.grad or a tensor shaped like p) cut to p's owned rows."""
        rows = self.owned_rows(p)
        if rows is None or rows == (0, _dim0(p)):
            return t
        return t[rows[0] : rows[1]]

    def has_master(self, p: Tensor) -> bool:
        """Whether `p`'s update goes through an FP32 master copy (p held below FP32)."""
        return self.master_weights and p.is_floating_point() and p.element_size() < 4

    def _weight(self, p: Tensor) -> Tensor:
        """What the update writes: p's FP32 master rows (created from p on first use) or p's
        owned rows themselves."""
        if not self.has_master(p):
            return self._rows_view(p, p)
        st = self.state[p]
        if "master" not in st:
            st["master"] = self._rows_view(p, p).float()
        return st["master"]

    def _state_like(self, p: Tensor) -> Tensor:
        """A zero FP32-or-p.dtype tensor shaped like p's owned rows (momentum, moments)."""
        w = self._rows_view(p, p)
        return torch.zeros_like(
            w,
            dtype=torch.float32 if self.has_master(p) else w.dtype,
            memory_format=torch.preserve_format,
        )

    def _write_back(self, params: list[Tensor]) -> None:
        """Round the updated master rows into the (BF16) parameters."""
        pairs = [
            (self._rows_view(p, p), self.state[p]["master"]) for p in params if self.has_master(p)
        ]
        if pairs:
            torch._foreach_copy_([w for w, _ in pairs], [m for _, m in pairs])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that master-weight parameters keep FP32 state (torch casts
        every floating state tensor to its parameter's dtype) and a `master` saved by a
        run without master weights is dropped."""
        super().load_state_dict(state_dict)
        flat = [p for g in self.param_groups for p in g["params"]]
        for pid, saved in state_dict["state"].items():
            p = flat[int(pid)]
            st = self.state.get(p)
            if st is None:
                continue
            if not self.has_master(p):
                st.pop("master", None)
                continue
            for k, v in saved.items():
                if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                    st[k] = v.to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the state of every owned trainable parameter now (momentum or AdamW's
        moments, FP32 masters) instead of at the first step: memory is claimed before any
        step's temporaries, so they cannot fragment the heap under it."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or self.owned_rows(p) is None:
                    continue
                if group["use_muon"]:
                    self._buffer(p)
                elif "exp_avg" not in self.state[p]:
                    st = self.state[p]
                    st["step"] = 0
                    st["exp_avg"], st["exp_avg_sq"] = self._state_like(p), self._state_like(p)
                if self.has_master(p):
                    self._weight(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear `.grad` and zero the FP32 `main_grad` buffers (they persist across steps)."""
        super().zero_grad(set_to_none)
        bufs = [
            g
            for grp in self.param_groups
            for p in grp["params"]
            if (g := getattr(p, "main_grad", None)) is not None
        ]
        if bufs:
            torch._foreach_zero_(bufs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon/AdamW update of every group, then `_after_update()` (QK-Clip in MuonClip)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_update()
        for group in self.param_groups:
            params = [
                p
                for p in group["params"]
                if grad_of(p) is not None and self.owned_rows(p) is not None
            ]
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
        for pieces, outs, scale in self._muon_buckets(group, params, split_params=True):
            targets = []
            for (i, lo, hi, _n), o in zip(pieces, outs, strict=True):
                w = self._piece(self._weight(params[i]), params[i], lo, hi, owned=True)
                # a contiguous parameter takes the [n, r, c] result as a view (no copy);
                # anything else gets a reshape
                targets.append(
                    (w.view(o.shape), o) if w.is_contiguous() else (w, o.reshape(w.shape))
                )
            ws = [w for w, _ in targets]
            if wd:
                torch._foreach_mul_(ws, 1.0 - lr * wd)  # decoupled weight decay
            torch._foreach_add_(ws, [o for _, o in targets], alpha=-lr * scale)
            self._write_back_pieces(params, pieces)

    def _write_back_pieces(
        self, params: list[Tensor], pieces: list[tuple[int, int, int, int]]
    ) -> None:
        """Round the master rows of a bucket's pieces into their (BF16) parameters."""
        pairs = [
            (
                self._piece(params[i], params[i], lo, hi),
                self._piece(self.state[params[i]]["master"], params[i], lo, hi, owned=True),
            )
            for i, lo, hi, _n in pieces
            if self.has_master(params[i])
        ]
        if pairs:
            torch._foreach_copy_([w for w, _ in pairs], [m for _, m in pairs])

    def _directions(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> Iterator[tuple[list[int], list[Tensor], float]]:
        """Momentum (+ Nesterov) and batched Newton-Schulz, bucket by bucket; yields per bucket
        (indices into `params`, orthogonalised updates shaped like their owned rows, scale).
        Each bucket's momentum is advanced when the bucket is reached: consume it all. The
        updates are views of the workspace: use them before asking for the next bucket."""
        for pieces, outs, scale in self._muon_buckets(group, params, split_params=False):
            shaped = [
                o.reshape(self._rows_view(params[i], params[i]).shape)
                for (i, _lo, _hi, _n), o in zip(pieces, outs, strict=True)
            ]
            yield [i for i, *_ in pieces], shaped, scale

    def _piece(self, t: Tensor, p: Tensor, lo: int, hi: int, owned: bool = False) -> Tensor:
        """Rows [lo, hi) of the owned rows of `t` (shaped like p, or like its owned rows when
        `owned`); a 2-D or >= 4-D matrix is one piece, whole."""
        v = t if owned else self._rows_view(t, p)
        return v[lo:hi] if p.ndim == 3 else v

    def _buffer(self, p: Tensor) -> Tensor:
        """p's momentum buffer, shaped like its owned rows (created on first use)."""
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = self._state_like(p)
        return st["momentum_buffer"]

    def _muon_buckets(
        self, group: dict[str, Any], params: list[Tensor], *, split_params: bool
    ) -> Iterator[tuple[list[tuple[int, int, int, int]], list[Tensor], float]]:
        """Bounded buckets of same-shaped matrices: per bucket advance the momentum, stack the
        (Nesterov) updates and orthogonalise them; yields (pieces, outputs, scale).

        A piece (i, lo, hi, n) is rows [lo, hi) of params[i]'s owned rows, n matrices; its
        output is [n, r, c], a view of the workspace until the next bucket. A bucket holds at most
        `bucket_bytes` of updates unless one piece alone is larger; `split_params` lets a 3-D
        stack be cut between buckets at whole dim-0 rows (experts).
        """
        by_shape: dict[tuple, list[tuple[int, int, int, int]]] = defaultdict(list)
        for i, p in enumerate(params):
            n, r, c = matrix_view_shape(p)
            rows = self._rows_view(p, p).shape[0] if p.ndim == 3 else 1
            per_row = n // _dim0(p) if p.ndim == 3 else n  # matrices per dim-0 row
            step = rows
            # the update's dtype: the master's (FP32) when there is one, else the parameter's;
            # buckets are sized in it (a BF16 parameter's update takes FP32 bytes)
            dtype = torch.float32 if self.has_master(p) else p.dtype
            if split_params and p.ndim == 3:
                size = torch.empty((), dtype=dtype).element_size()
                step = max(1, self.bucket_bytes // max(1, per_row * r * c * size))
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                by_shape[(r, c, p.device, dtype)].append((i, lo, hi, (hi - lo) * per_row))
        for (r, c, dev, dtype), pieces in by_shape.items():
            mat_bytes = r * c * torch.empty((), dtype=dtype).element_size()
            bucket: list[tuple[int, int, int, int]] = []
            size = 0
            for piece in pieces:
                if bucket and size + piece[3] * mat_bytes > self.bucket_bytes:
                    yield self._orthogonalise_bucket(group, params, bucket, r, c, dev, dtype)
                    bucket, size = [], 0
                bucket.append(piece)
                size += piece[3] * mat_bytes
            if bucket:
                yield self._orthogonalise_bucket(group, params, bucket, r, c, dev, dtype)

    def _orthogonalise_bucket(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        bucket: list[tuple[int, int, int, int]],
        r: int,
        c: int,
        dev: torch.device,
        dtype: torch.dtype,
    ) -> tuple[list[tuple[int, int, int, int]], list[Tensor], float]:
        mu = group["momentum"]
        grads = [self._piece(grad_of(params[i]), params[i], lo, hi) for i, lo, hi, _n in bucket]
        bufs = [
            self._piece(self._buffer(params[i]), params[i], lo, hi, owned=True)
            for i, lo, hi, _n in bucket
        ]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)  # M = mu*M + G
        total = sum(n for *_, n in bucket)
        if not group["nesterov"] and len(bucket) == 1 and bufs[0].is_contiguous():
            stacked = bufs[0].view(total, r, c)
        else:
            # the stacked update in the workspace (reused, so no fresh pages each step)
            (stacked,) = self.workspace.take(dev, [((total, r, c), dtype)], slot="stack")
            dst, off = [], 0
            for (_i, _lo, _hi, n), g in zip(bucket, grads, strict=True):
                dst.append(stacked[off : off + n].view(g.shape))
                off += n
            if group["nesterov"]:
                for d, g, b in zip(dst, grads, bufs, strict=True):
                    torch.add(g, b, alpha=mu, out=d)  # U = G + mu*M in one pass
            else:
                torch._foreach_copy_(dst, bufs)
        # the result stays in the NS dtype when that is exact in the update's dtype (bf16
        # into FP32: the weight update casts as it reads); a wider NS dtype is rounded to
        # the update's, as before
        wider = (
            torch.empty((), dtype=self.ns_dtype).element_size()
            > torch.empty((), dtype=dtype).element_size()
        )
        o = newton_schulz(
            stacked,
            group["ns_steps"],
            group["ns_coefficients"],
            group["ns_eps"],
            dtype=self.ns_dtype,
            out_dtype=dtype if wider else None,
            workspace=self.workspace,
        )
        return (
            bucket,
            list(o.split([n for *_, n in bucket])),
            adjusted_scale(r, c, group["adjust_lr_fn"]),
        )

    def _adamw_update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # bounded buckets too: the sqrt/denominator temporaries never span the whole group
        bucket: list[Tensor] = []
        size = 0
        for p in params:
            nbytes = self._rows_view(p, p).numel() * (4 if self.has_master(p) else p.element_size())
            if bucket and size + nbytes > self.bucket_bytes:
                self._adamw_bucket(group, bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            self._adamw_bucket(group, bucket)

    def _adamw_bucket(self, group: dict[str, Any], bucket: list[Tensor]) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        b1, b2 = group["betas"]
        params = [self._weight(p) for p in bucket]
        grads = [
            g if g.dtype == w.dtype else g.float()  # a BF16 .grad beside an FP32 master
            for g, w in zip((self._rows_view(grad_of(p), p) for p in bucket), params, strict=True)
        ]
        m, v, bc1, bc2 = [], [], [], []
        for p in bucket:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = self._state_like(p)
                st["exp_avg_sq"] = self._state_like(p)
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
        self._write_back(bucket)
