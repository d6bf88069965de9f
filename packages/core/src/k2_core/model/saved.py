"""Named saved activations: how a hand-written kernel tells an activation policy what it keeps.

An activation policy (k2_hw_h800.activations) decides, per tensor autograd saves, whether to
keep it, store it as FP8, send it to host memory or rebuild it in the backward. Tensors saved by
torch's own ops it can judge from the model's seams (`MLA.expand`, `SwiGLU.gated`); a custom
`torch.autograd.Function` is opaque, so it names what it saves instead: it builds one of the
tuples below and calls `announce_saved(saved)` just before `ctx.save_for_backward(...)`, and
reads its `ctx.saved_tensors` back through the same tuple. Nothing listens outside a policy's
layer forward, so an announcement costs one list check.

A kernel that changes what it saves changes the tuple here (and its policy handling), or a
policy that relies on the announcement fails loudly instead of silently saving more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch


class ExpertsSaved(NamedTuple):
    """What a routed-experts kernel (k2_moe's `_ExpertsFn`) keeps besides its inputs and weights.

    S rows reach the kernel (tokens x top-k, or the received rows under expert parallelism),
    N tokens; I and Is are the routed and shared intermediate sizes.
    """

    h: torch.Tensor  # [S, 2I] routed gate/up pre-activations (gate columns, then up)
    act: torch.Tensor  # [S, I] silu(h[:, :I]) * h[:, I:] * ws: rebuildable from h and ws
    ws: torch.Tensor  # [S, 1] each row's gate weight
    hs: torch.Tensor | None  # [N, 2Is] the shared expert's gate/up pre-activations (or None)
    acts: torch.Tensor | None  # [N, Is] silu(hs[:, :Is]) * hs[:, Is:] (or None)


_LISTENERS: list[Callable[[Any], None]] = []


def announce_saved(saved: Any) -> None:
    """Hand a kernel's named saved tensors to the innermost listener (an activation policy), if
    any."""
    if _LISTENERS:
        _LISTENERS[-1](saved)


@contextlib.contextmanager
def listen_saved(fn: Callable[[Any], None]) -> Iterator[None]:
    """Within the block, `fn` receives every `announce_saved` tuple (innermost listener wins)."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.pop()
