"""What an evaluation runs on: a checkpoint's model, tokenizer, dataset and training run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class EvalTarget:
    """A loaded checkpoint: the model (eval mode), its RunConfig when recorded, the tokenizer,
    the packed dataset it was trained on, and the training run it belongs to."""

    uri: str
    model: torch.nn.Module
    tokenizer: Any
    config: Any = None  # RunConfig | None
    data_uri: str | None = None
    step: int | None = None
    tracking_run_id: str | None = None
    _engine: Any = field(default=None, repr=False)

    def engine(self, batch_size: int = 16) -> Any:
        """The KV-cache generation engine over this model (rebuilt for another batch size)."""
        if self._engine is None or self._engine.max_batch_size != batch_size:
            from k2_data.inference.engine import Engine

            self._engine = Engine(self.model, self.tokenizer, max_batch_size=batch_size)
        return self._engine

    def manifest(self) -> dict[str, Any] | None:
        """The packed dataset's manifest, when the dataset is known and readable."""
        if not self.data_uri:
            return None
        try:
            from k2_data.loader import read_manifest

            return read_manifest(self.data_uri)
        except Exception:  # a missing dataset only costs the defaults it would have given
            return None

    def run_dir(self) -> Path | None:
        """The training run folder of a `<run>/checkpoints/step_N` checkpoint on local disk."""
        p = Path(self.uri.removeprefix("file://"))
        if p.parent.name == "checkpoints" and p.parent.parent.is_dir():
            return p.parent.parent
        return None


def _dataset_uri(cfg: Any) -> str | None:
    """The packed dataset a run trained on (None when the config names another dataset)."""
    if cfg is None:
        return None
    if cfg.data.dataset != "packed":
        return None
    return cfg.data.options.get("uri")


def load_target(uri: str, *, data: str | None = None, tokenizer: str | None = None) -> EvalTarget:
    """Load checkpoint `uri` for evaluation. The tokenizer is `tokenizer` (a saved k2 tokenizer
    folder), else the one of the packed dataset `data`, else the checkpoint's own (beside the
    weights, or its training dataset's). The dataset (for perplexity and the knowledge world)
    is `data`, else the run's, else the built-in corpus."""
    from k2_core.checkpoint import load_tensors
    from k2_core.modelio import load_checkpoint_model
    from k2_data.inference.resolve import find_tokenizer
    from k2_data.tokenizer import load_tokenizer

    model, cfg = load_checkpoint_model(uri)
    model.eval()
    _, attrs = load_tensors(uri, [])
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif data is not None:
        tok = load_tokenizer(f"{data.rstrip('/')}/tokenizer")
    else:
        tok = find_tokenizer(uri, cfg)
    data_uri = data or _dataset_uri(cfg)
    if data_uri is None and cfg is not None and cfg.data.dataset == "packed":
        from k2_data.prepare import default_dataset_uri

        data_uri = default_dataset_uri()
    return EvalTarget(
        uri=uri,
        model=model,
        tokenizer=tok,
        config=cfg,
        data_uri=data_uri,
        step=attrs.get("step"),
        tracking_run_id=attrs.get("tracking_run_id"),
    )
