"""Plugin hooks of k2_moe: the `moe` FFN and the `sigmoid_noaux_tc` router.

Kept light: importing this module imports neither torch nor the model code; the factories are
`"module:attr"` references, imported on first build (`k2 --help` loads every plugin module).
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .options import MoEOptions, RouterOptions


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the `moe` FFN and the `sigmoid_noaux_tc` router."""
    registry.register(
        "ffn",
        "moe",
        "k2_moe.moe:build_moe",
        MoEOptions,
        doc="DeepSeek-V3 MoE FFN: sigmoid router, sorted dispatch, shared experts.",
    )
    registry.register(
        "router",
        "sigmoid_noaux_tc",
        "k2_moe.router:build_router",
        RouterOptions,
        doc="Sigmoid router with aux-loss-free bias and group-limited top-k.",
    )
