"""Plugin hooks of k2_hw_h800: the `h800` backend.

Kept light: the factories import torch.distributed and the backend code on first use.
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .options import H800Options


def build_h800(*, options: H800Options) -> Any:
    """The `h800` backend: joins the torchrun job, builds the (pp, dp, ep) mesh."""
    from .backend import build_h800_backend

    return build_h800_backend(options=options)


def plan_command(*, options: Any) -> Any:
    """Plan pipeline/expert/data parallelism, micro-batching and per-GPU memory (k2 plan)."""
    from .commands import plan_command as impl

    return impl(options=options)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the `h800` backend."""
    registry.register("backend", "h800", build_h800, H800Options)
    registry.register("command", "plan", plan_command)
