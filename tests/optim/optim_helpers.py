"""Shared helpers of the k2_optim tests: a tiny k2 model and a tiny generic attention model."""

from __future__ import annotations

import math

import torch
from torch import nn


def k2_tiny(layers: int = 2, overrides: list[str] | None = None):
    """The `tiny` preset with `layers` layers (k2_core.model.build_model)."""
    from k2_core.configio import load_config
    from k2_core.errors import ConfigError
    from k2_core.model import build_model

    ov = [f"model.num_hidden_layers={layers}", *(overrides or [])]
    try:
        cfg = load_config("tiny", ov)
    except ConfigError:
        # another slot of the preset (e.g. a dataset) is not registered in this checkout:
        # the model sections are all these tests need
        from k2_core.config import RunConfig
        from k2_core.configio import _load_source, apply_overrides

        cfg = RunConfig.model_validate(apply_overrides(_load_source("tiny"), ov))
    return build_model(cfg)


class PlainAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections that records per-head max logits."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # a key bias gets no gradient
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.max_logits: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        return q @ k.transpose(-1, -2) / math.sqrt(self.hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        s = self.logits(x)
        self.max_logits = s.detach().amax(dim=(0, 2, 3)).float()
        v = self.v_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        out = torch.softmax(s, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class TinyLM(nn.Module):
    """Embedding, one PlainAttention, a 3-D expert-like weight with muon_split=2, norm, head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, experts: int = 3):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.attn = PlainAttention(dim, heads)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * 16, dim) * 0.1)
        self.gate_up.muon_split = 2
        self.down = nn.Parameter(torch.randn(experts, dim, 16) * 0.1)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        x = x + self.attn(x)
        h = torch.einsum("btd,efd->btef", x, self.gate_up)
        g, u = h.chunk(2, dim=-1)
        x = x + torch.einsum("btef,edf->btd", torch.nn.functional.silu(g) * u, self.down) / 3
        return self.lm_head(self.norm(x))


def plain_targets(model: TinyLM):
    """QKClipTargets of TinyLM: q and k rows (and biases) of every head get sqrt(gamma)."""
    from k2_optim import QKClipTarget

    a = model.attn
    return [
        QKClipTarget(
            max_logits=a,
            q_weight=a.q_proj.weight,
            k_weight=a.k_proj.weight,
            heads=a.heads,
            q_bias=a.q_proj.bias,
            name="attn",
        )
    ]
