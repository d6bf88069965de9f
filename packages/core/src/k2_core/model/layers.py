"""Small building blocks shared by the decoder and the FFN plugins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as DeepSeek-V3 does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with HF parameter names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated FFN."""
        return self.down_proj(self.gated(self.gate_proj(x), self.up_proj(x)))

    def gated(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """silu(g) * u: the step an activation policy wraps (k2_hw_h800 recomputes it)."""
        return F.silu(g) * u


def build_swiglu(model, moe, layer_idx: int, *, registry=None, options=None) -> SwiGLU:
    """Dense SwiGLU FFN of width `intermediate_size` (the first_k_dense_replace layers)."""
    return SwiGLU(model.hidden_size, model.intermediate_size)
