"""Deprecated: moved to k2_data.inference (a package of its own here, so that the old
submodule paths resolve to the new modules rather than to copies of them)."""

import warnings

from ..inference import Completion, Engine, SamplingParams

warnings.warn(
    "k2_data.generation moved to k2_data.inference; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Completion", "Engine", "SamplingParams"]
