"""The config of `k2 data prepare`: sources, mixture weights, tokenizer, packing.

Loaded from a YAML file over fsspec plus dotted overrides (`seq_len=512`), validated by
frozen pydantic models with one-line errors. No argument means the built-in corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_DOMAINS = ("code", "math", "knowledge")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Model):
    """One source of documents: files over fsspec, or a built-in corpus domain."""

    kind: Literal["files", "builtin"] = Field(
        "files", description="`files`: any fsspec URI or glob; `builtin`: k2's generated corpus."
    )
    uri: str | None = Field(
        None, description="fsspec URI or glob (local path, file://, memory://, s3://, gs://)."
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto",
        description="File format; `auto` by extension (.jsonl/.json[.gz|.zst], .parquet, else "
        "text).",
    )
    text_field: str = Field("text", description="Field holding the document text (jsonl, parquet).")
    id_field: str = Field(
        "id", description="Field holding the document id (falls back to file:row)."
    )
    domain: str = Field("web", description="Mixture domain of every document of this source.")
    scale: float = Field(1.0, gt=0, description="Size multiplier of a builtin corpus domain.")

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.kind == "files" and not self.uri:
            raise ValueError("a `files` source needs a `uri`")
        if self.kind == "builtin" and self.domain not in BUILTIN_DOMAINS:
            raise ValueError(f"builtin domain must be one of {', '.join(BUILTIN_DOMAINS)}")
        return self

    def describe(self) -> str:
        """A short label for reports."""
        return f"builtin:{self.domain}" if self.kind == "builtin" else str(self.uri)


class TokenizerConfig(_Model):
    """Which `tokenizer` slot implementation, and its options."""

    name: str = Field("bpe", description="`tokenizer` slot implementation (bpe, tiktoken, ...).")
    options: dict[str, Any] = Field(
        default_factory=lambda: {"vocab_size": 8192},
        description="Options of that tokenizer (vocab_size, path, ...), validated by its model.",
    )


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="builtin", domain=d) for d in BUILTIN_DOMAINS]


class DataPrepareConfig(_Model):
    """Everything `k2 data prepare` needs: what to read, how to tokenize, how to pack."""

    sources: list[SourceConfig] = Field(
        default_factory=_default_sources, description="Document sources, read round-robin."
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-domain mixture weight (default 1): w = floor(w) copies + one more with "
        "probability frac(w), decided by document hash and seed; 0 drops the domain.",
    )
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="Tokenizer implementation and options."
    )
    seq_len: int = Field(
        256, gt=0, description="Tokens per training sequence (rows hold seq_len+1)."
    )
    val_fraction: float = Field(
        0.01, ge=0, lt=1, description="Fraction of documents (by hash) held out for validation."
    )
    workers: int = Field(2, ge=0, description="Tokenizer worker processes (0: in-process).")
    max_chars: int = Field(1_000_000, gt=0, description="Longer documents are skipped (too_long).")
    seed: int = Field(0, description="Seed of the split, the mixture draws and document order.")
    shard_docs: int = Field(
        2048, gt=0, description="Documents per work shard (the unit of resume)."
    )
    batch_docs: int = Field(256, gt=0, description="Documents per batch sent to a worker.")
    tokenizer_sample_docs: int = Field(
        20_000, gt=0, description="Documents sampled (in reading order) to train a bpe tokenizer."
    )
    out: str | None = Field(
        None, description="Output URI; None: the cache folder ($K2_CACHE_DIR/data/...)."
    )

    @model_validator(mode="after")
    def _check(self) -> DataPrepareConfig:
        if not self.sources:
            raise ValueError("at least one source is needed")
        for k, w in self.weights.items():
            if w < 0:
                raise ValueError(f"weight of domain {k!r} must be >= 0 (got {w})")
        return self

    def weight(self, domain: str) -> float:
        """The mixture weight of `domain` (1 when unlisted)."""
        return float(self.weights.get(domain, 1.0))

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output bytes (not where it goes, nor how many workers)."""
        return self.model_dump(mode="json", exclude={"out", "workers", "batch_docs"})

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of `identity()`, first 12 hex digits."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def is_default_corpus(self) -> bool:
        """Whether every source is the built-in corpus."""
        return all(s.kind == "builtin" for s in self.sources)


def cache_dir() -> str:
    """`$K2_CACHE_DIR`, else `$XDG_CACHE_HOME/k2`, else `~/.cache/k2`."""
    if os.environ.get("K2_CACHE_DIR"):
        return os.environ["K2_CACHE_DIR"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg, "k2") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "k2")


def output_uri(cfg: DataPrepareConfig) -> str:
    """Where `cfg` writes: its `out`, else `<cache>/data/{builtin|prepared}-<config hash>`."""
    if cfg.out:
        return cfg.out.rstrip("/")
    kind = "builtin" if cfg.is_default_corpus() else "prepared"
    return os.path.join(cache_dir(), "data", f"{kind}-{cfg.config_hash()}")


def load_prepare_config(
    spec: str | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> DataPrepareConfig:
    """A YAML file/URI (or a dict, or None for the built-in corpus) plus dotted overrides."""
    from .pipeline.configload import load_model_config

    return load_model_config(DataPrepareConfig, spec, overrides)
