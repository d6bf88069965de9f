"""Plugin hooks of k2_moe: the `moe` FFN and the `sigmoid_noaux_tc` router.

Kept light: importing this module imports neither torch nor the model code; the factories
import them on first use (`k2 --help` loads every plugin module).
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .options import MoEOptions, RouterOptions


def moe_factory(model: Any, moe: Any, layer_idx: int, *, registry: Any, options: Any = None) -> Any:
    """DeepSeek-V3 MoE FFN: sigmoid router, sorted dispatch, shared experts (k2-moe)."""
    from .moe import build_moe

    return build_moe(model, moe, layer_idx, registry=registry, options=options)


def router_factory(model: Any, moe: Any, *, options: Any = None) -> Any:
    """Sigmoid router with aux-loss-free bias and group-limited top-k (k2-moe)."""
    from .router import build_router

    return build_router(model, moe, options=options)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the `moe` FFN and the `sigmoid_noaux_tc` router."""
    registry.register("ffn", "moe", moe_factory, MoEOptions)
    registry.register("router", "sigmoid_noaux_tc", router_factory, RouterOptions)
