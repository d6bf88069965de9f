"""Batched Newton-Schulz-5 orthogonalisation (the Muon / K2 MuonClip update direction).

Every matrix of the same shape is stacked into one [n, r, c] tensor and orthogonalised with
torch.bmm / torch.baddbmm, so a step costs one kernel per iteration per *shape*, not per matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(
    g: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthogonalise each matrix of `g` ([r, c] or [n, r, c]); returns the same shape.

    X = G / (||G||_F + eps) per matrix (norm taken in fp32), cast to `dtype` (bf16 as in K2),
    transposed when r > c so that the Gram matrix X X^T is the small one, then `steps`
    iterations of A = X X^T; B = b A + c A A; X = a X + B X. The result is returned in
    `out_dtype` (default: `dtype`).
    """
    a, b, c = coefficients
    squeeze = g.ndim == 2
    x = g.unsqueeze(0) if squeeze else g
    if x.ndim != 3:
        raise ValueError(f"newton_schulz expects [r, c] or [n, r, c], got {tuple(g.shape)}")
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=(-2, -1), keepdim=True)
    x = (xf / (norm + eps)).to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x.contiguous()
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)                                   # A = X X^T
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)     # B = b A + c A A
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)            # X = a X + B X
    if transposed:
        x = x.mT
    if out_dtype is not None and out_dtype != x.dtype:
        x = x.to(out_dtype)
    return x.squeeze(0) if squeeze else x
