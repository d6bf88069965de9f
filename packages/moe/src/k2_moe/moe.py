"""The MoE FFN: router + routed experts + shared experts, with HF `DeepseekV3MoE` names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from k2_core.model.layers import SwiGLU
from torch import nn

from .experts import (
    SMALL_BATCH_PAIRS,
    Dispatch,
    GroupedExperts,
    experts_forward,
    small_batch_forward,
)

if TYPE_CHECKING:
    from k2_core.config import ModelConfig, MoEConfig

    from .options import MoEOptions


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, n_seq: int, alpha: float
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

    Per sequence of T tokens: f_i = E / (k T) * #{t : i in topk_t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}, L = alpha * sum_i f_i P_i.
    `scores` [B*T, E] (unbiased affinities), `topk_idx` [B*T, k].
    """
    n, e = scores.shape
    k = topk_idx.shape[1]
    t = n // n_seq
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


class MoE(nn.Module):
    """DeepSeek-V3 / Kimi K2 MoE FFN, numerically equal to transformers' `DeepseekV3MoE`.

    Submodules: `gate` (the router), `experts` (`gate_up_proj`, `down_proj`) and
    `shared_experts` (absent when `n_shared_experts == 0`). Satisfies k2_core's
    `LoadBalanced`: `aux_loss`, `update_router_bias()`, `reset_counts()`, `load_stats()`.
    The shared expert's weights are used inside the routed experts' autograd node (its
    `forward` is not called), so hooks on `shared_experts` itself do not fire.
    """

    aux_loss: torch.Tensor | None

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        n_routed_experts: int,
        router: nn.Module,
        *,
        n_shared_experts: int = 1,
        bias_update_speed: float = 1e-3,
        seq_aux_loss_coef: float = 0.0,
        initializer_range: float = 0.02,
        kernel: str = "auto",
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.n_experts = n_routed_experts
        self.bias_update_speed = bias_update_speed
        self.seq_aux_loss_coef = seq_aux_loss_coef
        self.layer_idx = layer_idx
        self.gate = router
        self.experts = GroupedExperts(
            n_routed_experts,
            hidden_size,
            moe_intermediate_size,
            initializer_range=initializer_range,
            kernel=kernel,
        )
        if n_shared_experts > 0:
            self.shared_experts = SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts)
            for lin in (
                self.shared_experts.gate_proj,
                self.shared_experts.up_proj,
                self.shared_experts.down_proj,
            ):
                nn.init.normal_(lin.weight, std=initializer_range)
        else:
            self.shared_experts = None
        # tokens routed to each expert since the last bias update (not part of checkpoints'
        # HF layout, so not persistent)
        self.register_buffer(
            "expert_counts", torch.zeros(n_routed_experts, dtype=torch.int64), persistent=False
        )
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (or [N, H]) -> same shape."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight, scores = self.gate(flat)
        if (
            not torch.is_grad_enabled()
            and not self.training
            and topk_idx.numel() <= SMALL_BATCH_PAIRS
        ):
            self.aux_loss = None  # decoding: no counts, no balance loss, no sort
            out = small_batch_forward(
                flat, self.experts.gate_up_proj, self.experts.down_proj, topk_idx, topk_weight
            )
            if self.shared_experts is not None:
                out = out + self.shared_experts(flat).to(out.dtype)
            return out.view(shape).to(x.dtype)
        dispatch = Dispatch(topk_idx, self.n_experts)
        if self.training:
            with torch.no_grad():
                self.expert_counts.add_(dispatch.counts)
        if self.seq_aux_loss_coef > 0:
            n_seq = shape[0] if len(shape) == 3 else 1
            self.aux_loss = sequence_balance_loss(scores, topk_idx, n_seq, self.seq_aux_loss_coef)
        else:
            self.aux_loss = None
        # the shared expert runs inside the same autograd node, as an always-on expert
        out = experts_forward(
            flat,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            topk_weight,
            dispatch,
            shared=self.shared_experts,
            kernel=self.experts.kernel,
        )
        return out.view(shape).to(x.dtype)

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Apply the aux-loss-free bias update for this step's counts, then reset them."""
        if self.bias_update_speed > 0 and hasattr(self.gate, "update_bias"):
            self.gate.update_bias(self.expert_counts, self.bias_update_speed)
        self.expert_counts.zero_()

    @torch.no_grad()
    def reset_counts(self) -> None:
        """Drop this step's counts without touching the bias (e.g. a skipped optimizer step)."""
        self.expert_counts.zero_()

    @torch.no_grad()
    def load_stats(self) -> dict[str, torch.Tensor]:
        """`counts` [E] since the last bias update and `max_over_mean` (1.0 = perfectly even)."""
        c = self.expert_counts.clone()
        mean = c.float().mean()
        ratio = torch.where(
            mean > 0, c.max().float() / mean.clamp_min(1e-12), torch.ones_like(mean)
        )
        return {"counts": c, "max_over_mean": ratio}


def build_moe(
    model: ModelConfig,
    moe: MoEConfig,
    layer_idx: int,
    *,
    registry: Any,
    options: MoEOptions | None = None,
) -> MoE:
    """MoE FFN from the run config (the `ffn` slot's `moe` factory)."""
    router = registry.build(
        "router", moe.router, model, moe, options=moe.router_options, where="moe.router_options"
    )
    return MoE(
        model.hidden_size,
        moe.moe_intermediate_size,
        moe.n_routed_experts,
        router,
        n_shared_experts=moe.n_shared_experts,
        bias_update_speed=moe.bias_update_speed,
        seq_aux_loss_coef=moe.seq_aux_loss_coef,
        initializer_range=model.initializer_range,
        kernel="auto" if options is None else options.kernel,
        layer_idx=layer_idx,
    )
