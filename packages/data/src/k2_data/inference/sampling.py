"""Batched next-token choice with per-request randomness that does not depend on the batch.

Each row draws its uniform from a counter-based hash of (seed, step) instead of a shared RNG
stream, so a seeded request samples the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer bijection with good avalanche (lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row from its (seed, step), float64 [B]."""
    key = _mix32((seeds & _M32) ^ 0x5BD1E995)
    x = _mix32(key ^ _mix32(steps & _M32))
    return (x.double() + 0.5) / 4294967296.0


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor | None,
    *,
    any_sampled: bool = True,
    any_top_p: bool = True,
) -> torch.Tensor:
    """Next tokens [B] for logits [B, V]: argmax where temperature is 0, else nucleus sampling
    at each row's temperature and top_p by inverse CDF with that row's (seed, step) uniform.
    `any_sampled` / `any_top_p` False (known on the host) skip those paths without a sync
    (`steps` may then be None)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    sampled_rows = temperature > 0
    temp = torch.where(sampled_rows, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    u = uniforms(seeds, steps).to(probs.device)
    if any_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly ahead of each token
        sorted_p = sorted_p.masked_fill(before >= top_p[:, None], 0.0)  # the first always stays
        cdf = sorted_p.double().cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        sampled = order.gather(1, pick)[:, 0]
    else:
        cdf = probs.double().cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        sampled = pick[:, 0]
    return torch.where(sampled_rows, sampled, greedy)
