"""k2-data's registrations: the `tokenizer` implementations and the `k2 data` command.

Import-light on purpose: every `k2` command loads this module, so tokenizers, zarr and numpy
are imported inside the factories only.
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .loader_options import PackedOptions
from .tokenizer import BpeOptions, TiktokenOptions


def build_bpe(texts: Any = None, *, options: BpeOptions) -> Any:
    """Byte-level BPE (HF tokenizers) trained on the sources, K2's chat/tool special tokens."""
    from .tokenizer import build_bpe as impl

    return impl(texts, options=options)


def build_tiktoken(*, options: TiktokenOptions) -> Any:
    """A tiktoken BPE file (e.g. K2's tiktoken.model) with K2's special-token ids."""
    from .tokenizer import build_tiktoken as impl

    return impl(options=options)


def data_command(*, options: Any) -> Any:
    """Prepare, inspect and summarise packed pre-training datasets (k2 data ...)."""
    from .commands import data_command as impl

    return impl(options=options)


def build_packed(**kwargs: Any) -> Any:
    """Packed token sequences from `k2 data prepare` (default: the built-in corpus), resumable."""
    from .loader import build_packed as impl

    return impl(**kwargs)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the bpe and tiktoken tokenizers, the packed dataset and `k2 data`."""
    registry.register("tokenizer", "bpe", build_bpe, BpeOptions)
    registry.register("tokenizer", "tiktoken", build_tiktoken, TiktokenOptions)
    registry.register("command", "data", data_command)
    registry.register("dataset", "packed", build_packed, PackedOptions)
