"""Plugin hooks of k2_optim: optimizers `muon` / `muonclip`, lr schedules `wsd` / `cosine`.

Kept light: importing this module imports neither torch nor the optimizer code (every `k2`
CLI call loads it); the factories import them on first use. This is the only k2_optim module
that imports k2_core (and pydantic): they come with the `k2` extra, `pip install
'k2-optim[k2]'`, which pins the k2-core hook/registry API this module plugs into (0.1.x).
"""

from __future__ import annotations

from typing import Any, Literal

try:
    from k2_core.hookspecs import hookimpl
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # k2-optim installed alone (torch only): Muon/MuonClip still work
    raise ImportError(
        f"k2_optim.plugin is k2-optim's k2 integration and needs k2-core and pydantic "
        f"({e.name} is missing): pip install 'k2-optim[k2]'; Muon and MuonClip themselves "
        "need only torch (import k2_optim)"
    ) from e


class MuonOptions(BaseModel):
    """Options of `muon` (lr and weight_decay come from the optim section; they apply to the
    Muon matrices, and to the AdamW groups unless adamw_lr / adamw_weight_decay are set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    momentum: float = Field(0.95, ge=0, lt=1, description="Muon momentum mu.")
    nesterov: bool = Field(True, description="Nesterov update G + mu*M instead of M.")
    ns_steps: int = Field(5, gt=0, lt=100, description="Newton-Schulz iterations.")
    ns_coefficients: tuple[float, float, float] = Field(
        (3.4445, -4.7750, 2.0315), description="Newton-Schulz (a, b, c)."
    )
    ns_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Newton-Schulz precision."
    )
    adjust_lr_fn: Literal["match_rms_adamw", "original", "none"] = Field(
        "match_rms_adamw",
        description="Update scale: 0.2*sqrt(max(n, m)) (K2/Moonlight), Keller's "
        "sqrt(max(1, n/m)), or none.",
    )
    adamw_lr: float | None = Field(
        None, gt=0, description="lr of the AdamW groups (None: optim.lr)."
    )
    adamw_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    adamw_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    adamw_weight_decay: float | None = Field(
        None, ge=0, description="Weight decay of embeddings/head/router (None: optim.weight_decay)."
    )
    no_decay_1d: bool = Field(
        True, description="No weight decay on 1-D parameters (norms, biases)."
    )
    router_on_adamw: bool = Field(True, description="MoE router weight (`*.gate.weight`) on AdamW.")


class MuonClipOptions(MuonOptions):
    """Options of `muonclip`: Muon's plus QK-Clip's."""

    qk_clip: bool = Field(True, description="Apply QK-Clip after every update.")
    qk_clip_tau: float = Field(100.0, gt=0, description="Max-logit cap tau (K2: 100).")
    accumulate_max_logits: bool = Field(
        True, description="Max of each head's logits over all micro-batches since the last step."
    )
    distributed: bool = Field(
        False,
        description="ZeRO-1 DistributedMuonClip over the default process group "
        "(needs torch.distributed initialised; grads are all-reduced by the optimizer).",
    )


class WSDOptions(BaseModel):
    """Options of the `wsd` schedule: warm-up, constant, then decay over the last steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps (K2: 500).")
    decay_steps: int | None = Field(
        None, ge=0, description="Decay steps (overrides decay_fraction)."
    )
    decay_fraction: float = Field(
        0.2, ge=0, le=1, description="Decay length as a fraction of total_steps."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr / peak lr (K2: 0.1).")
    decay: Literal["cosine", "linear"] = Field("cosine", description="Decay shape.")


class CosineOptions(BaseModel):
    """Options of the `cosine` schedule: warm-up then cosine to min_lr_ratio at total_steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr / peak lr.")


def _muon_kwargs(
    model: Any, lr: float, weight_decay: float, options: MuonOptions
) -> dict[str, Any]:
    import torch

    from .grouping import param_groups

    groups = param_groups(
        model,
        lr,
        weight_decay,
        options.adamw_lr,
        options.adamw_weight_decay,
        router_on_adamw=options.router_on_adamw,
        no_decay_1d=options.no_decay_1d,
    )
    return dict(
        params=groups,
        lr=lr,
        weight_decay=weight_decay,
        momentum=options.momentum,
        nesterov=options.nesterov,
        ns_steps=options.ns_steps,
        ns_coefficients=options.ns_coefficients,
        adjust_lr_fn=options.adjust_lr_fn,
        adamw_lr=options.adamw_lr,
        adamw_betas=options.adamw_betas,
        adamw_eps=options.adamw_eps,
        adamw_weight_decay=options.adamw_weight_decay,
        ns_dtype=getattr(torch, options.ns_dtype),
    )


def build_muon(model: Any, *, lr: float, weight_decay: float, options: MuonOptions) -> Any:
    """Muon on the hidden matrices, AdamW on embeddings/head/router/norms (k2-optim)."""
    from .muon import Muon

    return Muon(**_muon_kwargs(model, lr, weight_decay, options))


def build_muonclip(model: Any, *, lr: float, weight_decay: float, options: MuonClipOptions) -> Any:
    """MuonClip: Muon + AdamW groups + QK-Clip on the MLA layers (K2 Algorithm 1, k2-optim)."""
    kwargs = _muon_kwargs(model, lr, weight_decay, options)
    kwargs.update(
        model=model,
        qk_clip=options.qk_clip,
        qk_clip_tau=options.qk_clip_tau,
        accumulate_max_logits=options.accumulate_max_logits,
    )
    if options.distributed:
        from .distributed import DistributedMuonClip

        return DistributedMuonClip(**kwargs)
    from .qkclip import MuonClip

    return MuonClip(**kwargs)


def _lambda_lr(optimizer: Any, fn: Any) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_wsd(optimizer: Any, *, total_steps: int, options: WSDOptions) -> Any:
    """Warm-up / stable / decay (K2: 500 warm-up, constant, cosine to 0.1x) as LambdaLR."""
    from .schedules import wsd_schedule

    warm = min(options.warmup_steps, total_steps)
    decay = (
        options.decay_steps
        if options.decay_steps is not None
        else round(options.decay_fraction * total_steps)
    )
    decay = max(0, min(decay, total_steps - warm))
    stable = total_steps - warm - decay
    return _lambda_lr(
        optimizer, wsd_schedule(warm, stable, decay, options.min_lr_ratio, options.decay)
    )


def build_cosine(optimizer: Any, *, total_steps: int, options: CosineOptions) -> Any:
    """Linear warm-up then cosine decay to min_lr_ratio at total_steps, as LambdaLR."""
    from .schedules import cosine_schedule

    warm = min(options.warmup_steps, total_steps)
    return _lambda_lr(optimizer, cosine_schedule(warm, total_steps, options.min_lr_ratio))


@hookimpl
def k2_register(registry: Any) -> None:
    """Register optimizers `muon`, `muonclip` and lr schedules `wsd`, `cosine`."""
    registry.register("optimizer", "muon", build_muon, MuonOptions)
    registry.register("optimizer", "muonclip", build_muonclip, MuonClipOptions)
    registry.register("lr_schedule", "wsd", build_wsd, WSDOptions)
    registry.register("lr_schedule", "cosine", build_cosine, CosineOptions)
