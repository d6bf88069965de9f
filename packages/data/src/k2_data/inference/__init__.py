"""Inference from k2 checkpoints, in one place: the batched, KV-cached engine (engine.py), the
request batcher (batcher.py), sampling (sampling.py), the tokenizer finder (resolve.py) and
`k2 serve` (server.py, its weight loader weights.py and its command line command.py).

The `generator` slot's implementations (generators/) sit beside the pipelines that call them;
the `k2` generator drives this engine in-process. Only `k2 serve` needs FastAPI.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    """The engine's names, imported on first use: `k2 --help` reaches `command` without torch."""
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
