"""Inference from k2 checkpoints, in one place: the batched, KV-cached engine (engine.py), the
request batcher (batcher.py), sampling (sampling.py), the tokenizer finder (resolve.py) and
`k2 serve` (server.py, its weight loader weights.py and its command line command.py).

The `generator` slot's implementations (generators/) sit beside the pipelines that call them;
the `k2` generator drives this engine in-process. Only `k2 serve` needs FastAPI.
"""

from .engine import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]
