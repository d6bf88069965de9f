"""Generation from k2 checkpoints: the batched, KV-cached engine and its sampling."""

from .engine import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]
