"""Layout-free, deferred initialisation: every parameter drawn from its own generator.

A generator is seeded from (run seed, parameter name[, expert index]), so a parameter gets
the same values whichever process materialises it, in whatever order: a rank that holds
experts 16..31 of a layer draws exactly the rows a single process would have drawn for them,
and a pipeline stage never allocates the layers of another stage. Parameters still on the
meta device are skipped (another rank trains them).

Conventions other packages rely on:
- `EXPERT_OFFSET_ATTR` on a 3-D parameter: the global index of its first row (an expert
  shard set by expert parallelism); each row e is drawn from the generator of expert
  `offset + e`. `GLOBAL_ROWS_ATTR`: the global tensor's dim 0 (all experts), for checkpoints.
- Buffers start at zero unless their module defines `reset_buffers()` (e.g. RoPE's inv_freq).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

EXPERT_OFFSET_ATTR = "_k2_expert_offset"
GLOBAL_ROWS_ATTR = "_k2_global_rows"


def global_rows(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """(global row of `t`'s first row, the global tensor's shape) of a possibly sharded tensor."""
    offset = int(getattr(t, EXPERT_OFFSET_ATTR, 0))
    shape = tuple(t.shape)
    if hasattr(t, GLOBAL_ROWS_ATTR):
        shape = (int(getattr(t, GLOBAL_ROWS_ATTR)), *shape[1:])
    return offset, shape


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit seed for (run seed, parameter name[, expert index]), the same on every platform."""
    key = f"{seed}:{name}" if index is None else f"{seed}:{name}:{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    """normal(0, std) drawn in FP32 (into a temporary of t's shape when t is narrower), so a
    BF16 tensor holds exactly the FP32 draw rounded, as if cast after an FP32 init."""
    g = _generator(t.device, seed)
    if t.dtype == torch.float32:
        t.normal_(0.0, std, generator=g)
    else:
        t.copy_(
            torch.empty(t.shape, dtype=torch.float32, device=t.device).normal_(
                0.0, std, generator=g
            )
        )


@torch.no_grad()
def seeded_normal_(p: torch.Tensor, seed: int, name: str, std: float) -> None:
    """Fill `p` with normal(0, std): one generator per tensor, or per expert row of a 3-D stack."""
    if p.ndim == 3:
        offset = int(getattr(p, EXPERT_OFFSET_ATTR, 0))
        for e in range(p.shape[0]):  # one-off set-up, not the hot path: a generator per expert
            _normal_(p[e], std, param_seed(seed, name, offset + e))
        return
    _normal_(p, std, param_seed(seed, name))


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for mod in model.modules():
        if type(mod).__name__.lower().endswith("norm"):
            ids.update(id(p) for p in mod.parameters(recurse=False))
    return ids


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float) -> None:
    """normal(0, std) for matrices, embeddings and expert stacks, ones for norms, zeros for
    biases; buffers zeroed then `reset_buffers()`; meta tensors (not held here) skipped."""
    norms = _norm_param_ids(model)
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        if id(p) in norms:
            p.fill_(1.0)
        elif p.ndim >= 2:
            seeded_normal_(p, seed, name, std)
        else:
            p.zero_()
    for b in model.buffers():
        if not b.is_meta:
            b.zero_()
    for mod in model.modules():
        reset = getattr(mod, "reset_buffers", None)
        if callable(reset) and not any(b.is_meta for b in mod.buffers(recurse=False)):
            reset()


def materialize(
    module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None
) -> nn.Module:
    """Allocate `module`'s meta parameters and buffers on `device` (uninitialised), in place;
    floating parameters in `dtype` when given (buffers keep theirs).

    Unlike `nn.Module.to_empty`, a parameter keeps its Python attributes (expert-parallel
    marks, `muon_split`, the expert offset) and a parameter shared by two modules (tied
    weights) stays shared.
    """
    device = torch.device(device)
    done: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                dt = dtype if dtype is not None and p.is_floating_point() else p.dtype
                new = nn.Parameter(
                    torch.empty_like(p, device=device, dtype=dt), requires_grad=p.requires_grad
                )
                new.__dict__.update(p.__dict__)
                done[id(p)] = new
            mod._parameters[key] = done[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in done:
                    done[id(b)] = torch.empty_like(b, device=device)
                mod._buffers[key] = done[id(b)]
    return module
