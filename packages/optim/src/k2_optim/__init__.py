"""k2_optim: Muon and MuonClip (QK-Clip) for any torch model, parameter grouping, LR
schedules, ZeRO-1-style distributed MuonClip and MuonClip inside DeepSpeed ZeRO-1 (deepspeed
imported only when that engine is built). Depends on torch only.

Exports resolve lazily (PEP 562): `import k2_optim.plugin` — which every `k2` CLI call does
through the entry point — must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "DeepSpeedMuonClip": "deepspeed_zero",
    "DistributedMuonClip": "distributed",
    "assign_owners": "distributed",
    "merge_state_dicts": "distributed",
    "classify": "grouping",
    "param_groups": "grouping",
    "Muon": "muon",
    "matrix_view_shape": "muon",
    "newton_schulz": "orthogonalize",
    "MuonClip": "qkclip",
    "QKClipTarget": "qkclip",
    "find_qk_clip_targets": "qkclip",
    "mla_target": "qkclip",
    "WSDSchedule": "schedules",
    "cosine_schedule": "schedules",
    "wsd_schedule": "schedules",
}

__all__ = [
    "DeepSpeedMuonClip",
    "DistributedMuonClip",
    "Muon",
    "MuonClip",
    "QKClipTarget",
    "WSDSchedule",
    "assign_owners",
    "classify",
    "cosine_schedule",
    "find_qk_clip_targets",
    "matrix_view_shape",
    "merge_state_dicts",
    "mla_target",
    "newton_schulz",
    "param_groups",
    "wsd_schedule",
]

if TYPE_CHECKING:
    from .deepspeed_zero import DeepSpeedMuonClip
    from .distributed import DistributedMuonClip, assign_owners, merge_state_dicts
    from .grouping import classify, param_groups
    from .muon import Muon, matrix_view_shape
    from .orthogonalize import newton_schulz
    from .qkclip import MuonClip, QKClipTarget, find_qk_clip_targets, mla_target
    from .schedules import WSDSchedule, cosine_schedule, wsd_schedule


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'k2_optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
