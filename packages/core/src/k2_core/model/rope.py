"""Rotary position embedding for MLA's shared rotary key, with YaRN as DeepSeek-V3 uses it.

Matches transformers' `_compute_yarn_parameters` (inv_freq with the linear ramp,
`attention_factor` on cos/sin) and `yarn_apply_mscale` (mscale_all_dim squared on the softmax
scale) bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, RopeScaling


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times yarn_get_mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = cfg.qk_head_dim ** (-0.5)
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_parameters(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [qk_rope_head_dim // 2] fp32, attention_factor) for `cfg`."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    rs: RopeScaling | None = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = rs.factor
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = float(
            yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim)
        )
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (
            dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))
        ) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp(
        (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1
    )
    extrapolation_factor = 1 - ramp
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables [B|1, T, rope_dim // 2] for given positions (shared by every layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = rope_parameters(cfg)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute inv_freq in place (after `to_empty`, or a meta build materialised)."""
        inv_freq, self.attention_factor = rope_parameters(self.cfg, device=self.inv_freq.device)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)

    def reset_buffers(self) -> None:
        """The model-init contract's name for `reset_parameters` (see `k2_core.model.init`)."""
        self.reset_parameters()

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B|1, T] -> (cos, sin), each [B|1, T, rope_dim // 2] in `dtype`."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        cos = freqs.cos()
        sin = freqs.sin()
        if self.attention_factor != 1.0:
            cos = cos * self.attention_factor
            sin = sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """Rotate the last dim of `x` (cos/sin already broadcastable to x[..., : d // 2]).

    interleave=True rotates pairs (x0, x1), (x2, x3), ... and returns them de-interleaved
    (evens then odds), exactly as transformers' `apply_rotary_pos_emb_interleave`;
    interleave=False rotates halves (x[:d/2], x[d/2:]) as `apply_rotary_pos_emb`.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
