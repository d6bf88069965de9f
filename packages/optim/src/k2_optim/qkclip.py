"""QK-Clip (K2 MuonClip): after the update, rescale the query/key weights of every attention
head whose max pre-softmax logit exceeded tau, so that the same input would give <= tau.

Per head h with S_max^h > tau, gamma_h = tau / S_max^h:
  query rows of the non-rotary part *= sqrt(gamma_h), query rows of the rotary part *= gamma_h,
  key rows of the non-rotary part *= sqrt(gamma_h); the shared rotary key and values untouched.
Every target is handled with a [heads, rows_per_head] scale built by torch ops (no loop
over heads); the loop is over layers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .muon import Muon

RowSpec = slice | Sequence[int] | None


def _rows(spec: RowSpec, block: int, default_all: bool) -> Tensor:
    mask = torch.zeros(block, dtype=torch.bool)
    if spec is None:
        if default_all:
            mask[:] = True
    elif isinstance(spec, slice):
        mask[spec] = True
    else:
        idx = list(spec)
        if idx:
            mask[torch.tensor(idx, dtype=torch.long)] = True
    return mask


@dataclass(eq=False)
class QKClipTarget:
    """One attention layer for QK-Clip on any torch model.

    max_logits: an nn.Module with a `max_logits` attribute, or a callable; either gives the
        [heads] max pre-softmax logits (softmax scale included) of the last forward, or None.
    q_weight / k_weight: the query / key projection weights (Parameters or views of one), rows
        laid out head-major: head h owns rows [h*D, (h+1)*D) with D = rows // heads. k_weight
        may be None (then only queries are scaled; use q_gamma_rows for an exact clip).
    heads: number of heads (same for q and k; GQA/MQA key sharing is not supported).
    q_sqrt_rows / q_gamma_rows / k_sqrt_rows: rows *within one head's block* scaled by
        sqrt(gamma) / gamma / sqrt(gamma): a slice, a list of ints, or None.
        None means "every row of the block" for q_sqrt_rows and k_sqrt_rows and "no row" for
        q_gamma_rows. Plain MHA: the defaults (q and k rows all get sqrt(gamma)).
        MLA: q_sqrt_rows=slice(0, nope), q_gamma_rows=slice(nope, nope+rope),
        k_sqrt_rows=slice(0, nope) on kv_b_proj (the value rows are left alone).
    q_bias / k_bias: optional biases of the projections, scaled like their rows.
    """

    max_logits: nn.Module | Callable[[], Tensor | None]
    q_weight: Tensor
    k_weight: Tensor | None
    heads: int
    q_sqrt_rows: RowSpec = None
    q_gamma_rows: RowSpec = ()
    k_sqrt_rows: RowSpec = None
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    name: str = ""
    _pow: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for which, w, sqrt_rows in (
            ("q", self.q_weight, self.q_sqrt_rows),
            ("k", self.k_weight, self.k_sqrt_rows),
        ):
            if w is None:
                continue
            if w.shape[0] % self.heads:
                raise ValueError(
                    f"{self.name or 'QKClipTarget'}: {which} rows {w.shape[0]} "
                    f"not divisible by heads {self.heads}"
                )
            block = w.shape[0] // self.heads
            pw = _rows(sqrt_rows, block, True).float() * 0.5
            if which == "q":
                gm = _rows(self.q_gamma_rows, block, False)
                if (gm & (pw > 0)).any():
                    raise ValueError(f"{self.name or 'QKClipTarget'}: q rows both sqrt and gamma")
                pw = torch.where(gm, torch.ones_like(pw), pw)
            self._pow[which] = pw  # [D] exponent of gamma

    def read_max_logits(self) -> Tensor | None:
        """The [heads] max logits of the last forward (or None when nothing was recorded)."""
        src = self.max_logits
        ml = getattr(src, "max_logits", None) if isinstance(src, nn.Module) else src()
        return None if ml is None else ml.reshape(-1)

    @torch.no_grad()
    def apply(
        self, gamma: Tensor, master: Callable[[Tensor], tuple[Tensor, int] | None] | None = None
    ) -> None:
        """Scale rows by gamma [heads] (1 where the head is not clipped); `master(w)` gives
        (w's FP32 master rows, their first row) to scale alike, or None."""
        for which, w, b in (("q", self.q_weight, self.q_bias), ("k", self.k_weight, self.k_bias)):
            if w is None:
                continue
            pw = self._pow[which]
            if pw.device != w.device:
                pw = self._pow[which] = pw.to(w.device)
            scale = gamma.to(device=w.device, dtype=torch.float32).unsqueeze(1).pow(pw).reshape(-1)
            w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.ndim - 1))))
            got = master(w) if master is not None else None
            if got is not None:
                m, start = got
                m.mul_(scale[start : start + m.shape[0]].view(-1, *([1] * (m.ndim - 1))))
            if b is not None:
                b.mul_(scale.to(b.dtype))


def is_mla(module: nn.Module) -> bool:
    """Duck-typed k2 MLA (k2_core.model.attention.MLA): records max_logits, has MLA geometry."""
    need = (
        "max_logits",
        "num_heads",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "kv_b_proj",
    )
    if not all(hasattr(module, a) for a in need):
        return False
    return (
        getattr(module, "q_b_proj", None) is not None or getattr(module, "q_proj", None) is not None
    )


def mla_target(module: nn.Module, name: str = "") -> QKClipTarget:
    """The QKClipTarget of one MLA module: q_b_proj (or q_proj) and kv_b_proj rows."""
    q = module.q_b_proj if getattr(module, "q_b_proj", None) is not None else module.q_proj
    nope, rope = int(module.qk_nope_head_dim), int(module.qk_rope_head_dim)
    return QKClipTarget(
        max_logits=module,
        q_weight=q.weight,
        k_weight=module.kv_b_proj.weight,
        heads=int(module.num_heads),
        q_sqrt_rows=slice(0, nope),
        q_gamma_rows=slice(nope, nope + rope),
        k_sqrt_rows=slice(0, nope),
        q_bias=getattr(q, "bias", None),
        name=name,
    )


def find_qk_clip_targets(model: nn.Module) -> list[QKClipTarget]:
    """Every MLA-like attention module of `model` (duck typing, no k2_core import), in order."""
    return [mla_target(m, name) for name, m in model.named_modules() if is_mla(m)]


def _identity(x: Tensor) -> Tensor:
    return x


class MuonClip(Muon):
    """Muon + AdamW groups + QK-Clip after every update (K2 Algorithm 1).

    `MuonClip(model, lr=...)` groups the model's parameters (see `param_groups`) and finds its
    k2 MLA layers by duck typing; otherwise pass `qk_clip_targets` (a list of QKClipTarget)
    or `model=` for discovery. Remaining keyword arguments are Muon's.

    qk_clip_tau: the logit cap (K2: 100). qk_clip: False disables the clip.
    max_logit_reduce: called on the concatenated [sum of heads] fp32 max-logit tensor before
        clipping (distributed training: all-reduce MAX); default identity.
    accumulate_max_logits: for module targets, a forward hook keeps the running max of
        `max_logits` over the grad-enabled forwards since the last step (gradient
        accumulation: the max over all micro-batches); forwards under no_grad (evaluation) do
        not count. Only the first step also uses a forward run before the optimizer existed.
        Without hooks, a module's `max_logits` tensor is used at most once (by identity), so
        a step without a new forward never clips twice on stale logits.
    After each step `last_clip_stats` = {"max_logit": 0-d, "heads_clipped": int64 0-d,
    "per_layer_max": [layers], "per_layer_clipped": int64 [layers]} (tensors, no host
    sync), or None when nothing was recorded.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        *args: Any,
        qk_clip: bool = True,
        qk_clip_tau: float = 100.0,
        qk_clip_targets: Sequence[QKClipTarget] | None = None,
        model: nn.Module | None = None,
        max_logit_reduce: Callable[[Tensor], Tensor] | None = None,
        accumulate_max_logits: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, weight_decay, *args, **kwargs)
        if model is None and isinstance(params, nn.Module):
            model = params
        if qk_clip_targets is None:
            qk_clip_targets = find_qk_clip_targets(model) if model is not None else []
        if qk_clip_tau <= 0:
            raise ValueError(f"qk_clip_tau must be > 0, got {qk_clip_tau}")
        self.qk_clip = qk_clip
        self.qk_clip_tau = float(qk_clip_tau)
        self.qk_clip_targets: list[QKClipTarget] = list(qk_clip_targets)
        self.max_logit_reduce = max_logit_reduce or _identity
        self.last_clip_stats: dict[str, Tensor] | None = None
        self._running: dict[int, Tensor] = {}
        self._consumed: dict[int, Tensor] = {}
        self._clip_calls = 0
        self._hooks: list[Any] = []
        if accumulate_max_logits and qk_clip:
            for i, t in enumerate(self.qk_clip_targets):
                if isinstance(t.max_logits, nn.Module):
                    self._hooks.append(t.max_logits.register_forward_hook(self._make_hook(i)))

    def _make_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            ml = getattr(module, "max_logits", None)
            if ml is None or not torch.is_grad_enabled():
                return
            ml = ml.detach().float().reshape(-1)
            prev = self._running.get(i)
            self._running[i] = ml.clone() if prev is None else torch.maximum(prev, ml)

        return hook

    def remove_hooks(self) -> None:
        """Detach the max-logit accumulation hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _current_max_logits(self) -> list[Tensor | None]:
        out = []
        for i, t in enumerate(self.qk_clip_targets):
            if not isinstance(t.max_logits, nn.Module):
                out.append(t.read_max_logits())
                continue
            last = getattr(t.max_logits, "max_logits", None)
            running = self._running.get(i)
            hooked = bool(self._hooks) and self._clip_calls > 0
            if (
                running is None
                and not hooked
                and last is not None
                and last is not self._consumed.get(i)
            ):
                # no hook, or the first step after a forward run before the optimizer existed
                running = last.detach().float().reshape(-1)
            if last is not None:
                self._consumed[i] = last  # never clip twice on the same logits
            out.append(running)
        return out

    def _after_update(self) -> None:
        self.apply_qk_clip()

    def _master_rows(self, w: Tensor) -> tuple[Tensor, int] | None:
        """(the FP32 master rows this process holds of parameter w, their first row), or None."""
        st = self.state.get(w)
        if not st or "master" not in st:
            return None
        rows = self.owned_rows(w)
        return None if rows is None else (st["master"], rows[0])

    @torch.no_grad()
    def apply_qk_clip(self) -> dict[str, Tensor] | None:
        """Clip every target from its recorded max logits (step() calls this after updating)."""
        if not self.qk_clip or not self.qk_clip_targets:
            return None
        logits = self._current_max_logits()
        self._running = {}
        self._clip_calls += 1
        if self.max_logit_reduce is not _identity:
            # a collective: a process that holds a layer but recorded nothing for it (e.g. no
            # forward of its own this step) still joins it, with a max logit that never wins
            # (layers of other pipeline stages, on meta, stay out on every rank of the group)
            logits = [
                torch.full((t.heads,), -math.inf, device=t.q_weight.device)
                if ml is None and not t.q_weight.is_meta
                else ml
                for t, ml in zip(self.qk_clip_targets, logits, strict=True)
            ]
        pairs = [
            (t, ml) for t, ml in zip(self.qk_clip_targets, logits, strict=True) if ml is not None
        ]
        if not pairs:
            self.last_clip_stats = None
            return None
        counts = [ml.numel() for _, ml in pairs]
        flat = torch.cat([ml.float() for _, ml in pairs])
        flat = self.max_logit_reduce(flat)
        tau = self.qk_clip_tau
        over = flat > tau  # NaN compares False: never clipped
        gamma = torch.where(over, tau / flat.clamp(min=tau), torch.ones_like(flat))
        for (t, _), g in zip(pairs, gamma.split(counts), strict=True):
            t.apply(g, self._master_rows)
        if len(set(counts)) == 1:
            per_layer = flat.view(len(counts), counts[0]).amax(dim=1)
            per_clip = over.view(len(counts), counts[0]).sum(dim=1)
        else:
            per_layer = torch.stack([x.amax() for x in flat.split(counts)])
            per_clip = torch.stack([x.sum() for x in over.split(counts)])
        self.last_clip_stats = {
            "max_logit": flat.amax(),
            "heads_clipped": over.sum(),
            "per_layer_max": per_layer,
            "per_layer_clipped": per_clip,
        }
        return self.last_clip_stats
