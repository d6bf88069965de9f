"""k2_moe: Kimi-K2 / DeepSeek-V3 mixture-of-experts layers for k2.

Public API (imported lazily, so `import k2_moe.plugin` does not pull in torch):
`MoE`, `SigmoidRouter`, `GroupedExperts`, `Dispatch`, `sequence_balance_loss`,
`build_moe`, `build_router`, `MoEOptions`, `RouterOptions`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MoE": ".moe",
    "build_moe": ".moe",
    "sequence_balance_loss": ".moe",
    "SigmoidRouter": ".router",
    "build_router": ".router",
    "GroupedExperts": ".experts",
    "Dispatch": ".experts",
    "MoEOptions": ".options",
    "RouterOptions": ".options",
}

__all__ = [
    "Dispatch",
    "GroupedExperts",
    "MoE",
    "MoEOptions",
    "RouterOptions",
    "SigmoidRouter",
    "__version__",
    "build_moe",
    "build_router",
    "sequence_balance_loss",
]

if TYPE_CHECKING:
    from .experts import Dispatch, GroupedExperts
    from .moe import MoE, build_moe, sequence_balance_loss
    from .options import MoEOptions, RouterOptions
    from .router import SigmoidRouter, build_router


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'k2_moe' has no attribute {name!r}")
