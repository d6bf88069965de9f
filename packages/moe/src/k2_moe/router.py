"""The router: sigmoid scores, a selection-only correction bias, group-limited top-k.

Numerics follow transformers' `DeepseekV3TopkRouter` exactly (fp32 logits, sigmoid, bias
added for the choice only, group score = sum of the top-2 biased scores of each group,
weights gathered from the unbiased scores, renormalised with +1e-20, scaled), and in addition
honour `scoring_func="softmax"` and `topk_method="greedy"`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from k2_core.precision import autocast
from torch import nn

if TYPE_CHECKING:
    from k2_core.config import ModelConfig, MoEConfig

    from .options import RouterOptions


class SigmoidRouter(nn.Module):
    """Top-k router with aux-loss-free balancing (DeepSeek-V3 `noaux_tc`).

    Parameters keep HF names: `weight` [E, H] (fp32) and the persistent fp32 buffer
    `e_score_correction_bias` [E].
    """

    def __init__(
        self,
        hidden_size: int,
        n_routed_experts: int,
        num_experts_per_tok: int,
        *,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        scoring_func: str = "sigmoid",
        topk_method: str = "noaux_tc",
        initializer_range: float = 0.02,
        fp32: bool = True,
    ):
        super().__init__()
        if n_routed_experts % n_group:
            raise ValueError(
                f"n_group ({n_group}) must divide n_routed_experts ({n_routed_experts})"
            )
        if scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func must be sigmoid or softmax, got {scoring_func!r}")
        if topk_method not in ("noaux_tc", "greedy"):
            raise ValueError(f"topk_method must be noaux_tc or greedy, got {topk_method!r}")
        self.hidden_size = hidden_size
        self.n_experts = n_routed_experts
        self.top_k = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.scoring_func = scoring_func
        self.topk_method = topk_method
        self.initializer_range = initializer_range
        self.fp32 = fp32
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, dtype=torch.float32))
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(n_routed_experts, dtype=torch.float32),
            persistent=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weight, zero bias (as HF initialises them)."""
        nn.init.normal_(self.weight, std=self.initializer_range)
        with torch.no_grad():
            self.e_score_correction_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"experts={self.n_experts}, top_k={self.top_k}, "
            f"groups={self.topk_group}/{self.n_group}, "
            f"{self.scoring_func}/{self.topk_method}, scale={self.routed_scaling_factor}"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route `x` [N, H] (or [..., H]).

        Returns (topk_idx [N, k] int64, topk_weight [N, k] fp32, scores [N, E] fp32), where
        `scores` are the unbiased sigmoid (or softmax) affinities.
        """
        x = x.reshape(-1, self.hidden_size)
        if self.fp32:
            with autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight.to(x.dtype)).float()
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        with torch.no_grad():
            topk_idx = self._select(scores.detach())
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, scores

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the chosen experts (bias and groups used for the choice only)."""
        if self.topk_method == "greedy":
            return torch.topk(scores, k=self.top_k, dim=-1, sorted=False)[1]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            n = choice.shape[0]
            per_group = self.n_experts // self.n_group
            group_scores = choice.view(n, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
            group_mask.scatter_(1, group_idx, True)
            score_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, per_group).reshape(n, -1)
            choice = choice.masked_fill(~score_mask, float("-inf"))
        return torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, speed: float) -> None:
        """Aux-loss-free update: bias += speed * sign(mean(counts) - counts)."""
        c = counts.to(device=self.e_score_correction_bias.device, dtype=torch.float32)
        self.e_score_correction_bias.add_(torch.sign(c.mean() - c), alpha=speed)


def build_router(
    model: ModelConfig, moe: MoEConfig, *, options: RouterOptions | None = None
) -> SigmoidRouter:
    """Router from the run config (the `router` slot's `sigmoid_noaux_tc` factory)."""
    return SigmoidRouter(
        model.hidden_size,
        moe.n_routed_experts,
        moe.num_experts_per_tok,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
        scoring_func=moe.scoring_func,
        topk_method=moe.topk_method,
        initializer_range=model.initializer_range,
        fp32=True if options is None else options.fp32,
    )
