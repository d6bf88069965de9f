"""Plugin hooks of k2_hw_h800: the `h800` backend.

Kept light: the implementations are `"module:attr"` references, so torch.distributed and the
backend code are imported on first build.
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .options import H800Options


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the `h800` backend and `k2 plan`."""
    registry.register(
        "backend",
        "h800",
        "k2_hw_h800.backend:build_h800_backend",
        H800Options,
        doc="The `h800` backend: joins the torchrun job, builds the (pp, dp, ep) mesh.",
    )
    registry.register("command", "plan", "k2_hw_h800.commands:plan_command")
