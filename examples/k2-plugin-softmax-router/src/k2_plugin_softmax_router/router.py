"""The router module: returns (top-k expert ids, their weights, all scores) like k2's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxTopKRouter(nn.Module):
    """Linear scores, softmax over experts, top-k selection."""

    def __init__(
        self,
        hidden: int,
        n_experts: int,
        k: int,
        *,
        renormalize: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.k, self.renormalize = k, renormalize
        self.weight = nn.Parameter(torch.empty(n_experts, hidden).normal_(0.0, init_std))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (ids [N, k] int64, weights [N, k], scores [N, E] fp32)."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, ids = scores.topk(self.k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights, scores
