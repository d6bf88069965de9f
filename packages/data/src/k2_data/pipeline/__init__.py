"""The synthesis pipeline engine: sharded, exactly-once, local (asyncio) or Ray execution."""

from .engine import ItemResult, Processor, RunSummary, Stage, error_kind, run_pipeline
from .options import GeneratorSpec, PipelineOptions, build_generator
from .store import ShardStore, read_outputs

__all__ = [
    "GeneratorSpec",
    "ItemResult",
    "PipelineOptions",
    "Processor",
    "RunSummary",
    "ShardStore",
    "Stage",
    "build_generator",
    "error_kind",
    "read_outputs",
    "run_pipeline",
]
