"""Options of the synthesis pipeline engine (shared by `k2 rephrase` and `k2 synth-tools`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PipelineOptions(BaseModel):
    """Where a run writes, how it is split and executed, and what it tracks."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    out: str = Field(..., description="Run folder URI (local path, file://, memory://, s3://).")
    shard_size: int = Field(64, gt=0, description="Input items per shard (the unit of commit).")
    concurrency: int = Field(16, gt=0, description="Items in flight at once (per process).")
    executor: Literal["local", "ray"] = Field(
        "local", description="`local`: asyncio in this process; `ray`: one Ray task per shard."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; None starts a local instance."
    )
    ray_num_cpus: int | None = Field(
        None, gt=0, description="CPUs of a local Ray instance (None: all)."
    )
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="Output file format.")
    tracking: bool = Field(True, description="Log counts and a sample of outputs to mlflow.")
    tracking_uri: str | None = Field(
        None,
        description="mlflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite in `out` "
        "(local out only).",
    )
    experiment: str = Field("k2-synth", description="mlflow experiment name.")
    sample_size: int = Field(20, ge=0, description="Output records logged as the sample artifact.")
    progress: bool = Field(True, description="Show a progress bar (plain lines off a TTY).")


class GeneratorSpec(BaseModel):
    """Which `generator` implementation, and its options (validated by its own model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("openai", description="`generator` slot implementation (openai, k2, ...).")
    options: dict = Field(
        default_factory=dict, description="Its options, e.g. {base_url: ..., model: ...}."
    )

    def identity(self) -> dict:
        """What of the generator decides outputs: the model, not where it is served from, nor
        concurrency, timeouts or retries (a rerun may point at a restarted server)."""
        keep = {"model", "checkpoint", "uri", "temperature", "top_p", "max_tokens"}
        return {"name": self.name, **{k: v for k, v in self.options.items() if k in keep}}


def build_generator(spec: GeneratorSpec, where: str = "generator") -> object:
    """The generator `spec` names, built through the plugin registry."""
    from k2_core.plugins import get_plugins

    return get_plugins().registry.build(
        "generator", spec.name, options=spec.options, where=f"{where}.options"
    )
