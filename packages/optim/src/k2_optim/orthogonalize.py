"""Batched Newton-Schulz-5 orthogonalisation (the Muon / K2 MuonClip update direction).

Every matrix of the same shape is stacked into one [n, r, c] tensor and orthogonalised with
torch.bmm / torch.baddbmm, so a step costs one kernel per iteration per *shape*, not per matrix.

Copy-free: the normalisation writes the NS dtype directly (one pass, no FP32 temporary), a
tall matrix is iterated in its own layout (Gram matrix X^T X, update X B: no transposed
copies in or out), and with an `NSWorkspace` the iterates live in reused buffers (no fresh
allocation, so no page faults, per iteration or per step).
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

_ALIGN = 64  # bytes between the views carved from a workspace arena


class NSWorkspace:
    """Scratch memory reused by every Newton-Schulz batch (and a Muon step's stacked update):
    one byte arena per device, grown to the largest request and carved into typed views.

    Views from one `take` are valid until the next `take` of the same slot: a caller
    consumes a bucket's result before starting the next bucket. Holds no state of its own
    (nothing to save or load); `clear()` returns the memory.
    """

    def __init__(self) -> None:
        self._arenas: dict[tuple[torch.device, str], Tensor] = {}

    def take(
        self,
        device: torch.device,
        specs: list[tuple[tuple[int, ...], torch.dtype]],
        slot: str = "ns",
    ) -> list[Tensor]:
        """Uninitialised tensors of the given (shape, dtype)s, side by side in `slot`'s arena
        on `device` (views taken from other slots stay valid)."""
        offsets, total = [], 0
        for shape, dtype in specs:
            n = 1
            for s in shape:
                n *= s
            offsets.append(total)
            total += -(-n * torch.empty((), dtype=dtype).element_size() // _ALIGN) * _ALIGN
        key = (torch.device(device), slot)
        arena = self._arenas.get(key)
        if arena is None or arena.numel() < total:
            self._arenas.pop(key, None)
            del arena  # the old arena goes before the new one is allocated
            arena = self._arenas[key] = torch.empty(max(total, 1), dtype=torch.uint8, device=key[0])
        out = []
        for (shape, dtype), off in zip(specs, offsets, strict=True):
            size = torch.empty((), dtype=dtype).element_size()
            n = 1
            for s in shape:
                n *= s
            out.append(arena[off : off + n * size].view(dtype).view(shape))
        return out

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.numel() for a in self._arenas.values())

    def clear(self) -> None:
        """Free the arenas (they are re-created on the next use)."""
        self._arenas.clear()


def newton_schulz(
    g: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype | None = None,
    *,
    workspace: NSWorkspace | None = None,
) -> Tensor:
    """Orthogonalise each matrix of `g` ([r, c] or [n, r, c]); returns the same shape.

    X = G / (||G||_F + eps) per matrix (norm taken in fp32, the quotient written in `dtype`,
    bf16 as in K2), then `steps` iterations of A = X X^T; B = b A + c A A; X = a X + B X on
    the smaller Gram matrix: a matrix with r > c runs the transposed iteration in place,
    A = X^T X; X = a X + X B (the same numbers as transposing it, without the copies). The
    result is returned in `out_dtype` (default: `dtype`). With a `workspace` the result is a
    view of its memory, valid until the workspace's next use.
    """
    a, b, c = coefficients
    squeeze = g.ndim == 2
    x = g.unsqueeze(0) if squeeze else g
    if x.ndim != 3:
        raise ValueError(f"newton_schulz expects [r, c] or [n, r, c], got {tuple(g.shape)}")
    n, rows, cols = x.shape
    tall = rows > cols
    m = min(rows, cols)
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    norm.add_(eps)
    if workspace is None:
        bufs = [torch.empty((n, rows, cols), dtype=dtype, device=x.device) for _ in range(2)]
        bufs += [torch.empty((n, m, m), dtype=dtype, device=x.device) for _ in range(2)]
    else:
        bufs = workspace.take(x.device, [((n, rows, cols), dtype)] * 2 + [((n, m, m), dtype)] * 2)
    cur, nxt, gram, poly = bufs
    torch.div(x, norm, out=cur)  # computed in fp32, rounded once into `dtype`
    for _ in range(steps):
        if tall:
            torch.bmm(cur.mT, cur, out=gram)  # A = X^T X
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # B = b A + c A A
            torch.baddbmm(cur, cur, poly, beta=a, alpha=1.0, out=nxt)  # X = a X + X B
        else:
            torch.bmm(cur, cur.mT, out=gram)  # A = X X^T
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # B = b A + c A A
            torch.baddbmm(cur, poly, cur, beta=a, alpha=1.0, out=nxt)  # X = a X + B X
        cur, nxt = nxt, cur
    if out_dtype is not None and out_dtype != cur.dtype:
        cur = cur.to(out_dtype)
    return cur.squeeze(0) if squeeze else cur
