"""k2-data's registrations: the `tokenizer` implementations and the `k2 data` command.

Import-light on purpose: every `k2` command loads this module, so tokenizers, zarr and numpy
are imported inside the factories only.
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .generators.local import LocalOptions
from .generators.openai_client import OpenAIOptions
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


def build_openai_generator(*, options: OpenAIOptions) -> Any:
    """Any OpenAI-compatible endpoint (vLLM, SGLang, k2 serve): retries, bounded concurrency."""
    from .generators.openai_client import build_openai

    return build_openai(options=options)


def build_rephrase_synthesizer(*, options: Any) -> Any:
    """Knowledge/math rephrasing with fidelity checks (RephraseConfig -> k2 rephrase's run)."""
    from .pipeline.synthesizer import Synthesizer
    from .rephrase import RephraseConfig, run_rephrase

    return Synthesizer("rephrase", RephraseConfig, run_rephrase)


def build_tool_use_synthesizer(*, options: Any) -> Any:
    """Tool specs, agents, tasks, judged trajectories (SynthToolsConfig -> k2 synth-tools)."""
    from .pipeline.synthesizer import Synthesizer
    from .synth_tools import SynthToolsConfig, run_synth_tools

    return Synthesizer("tool_use", SynthToolsConfig, run_synth_tools)


def rephrase_command(*, options: Any) -> Any:
    """Rewrite documents in several styles, checked for fidelity (k2 rephrase)."""
    from .rephrase.command import rephrase_command as impl

    return impl(options=options)


def synth_tools_command(*, options: Any) -> Any:
    """Synthesise tool specs, agents, tasks and judged trajectories (k2 synth-tools)."""
    from .synth_tools.command import synth_tools_command as impl

    return impl(options=options)


def build_k2_generator(*, options: LocalOptions) -> Any:
    """A k2 checkpoint in this process: batched sampling with MLA's compressed KV cache."""
    from .generators.local import build_local

    return build_local(options=options)


def serve_command(*, options: Any) -> Any:
    """Serve a k2 checkpoint over an OpenAI-compatible HTTP API (k2 serve URI)."""
    from .serve_command import serve_command as impl

    return impl(options=options)


@hookimpl
def k2_on_export(src: str, run_config: Any, dest: str, tokenizer: str | None) -> list[str]:
    """`k2 export-hf`: the checkpoint's tokenizer as HF files, with K2's chat template."""
    from .hf_export import export_tokenizer

    return export_tokenizer(src, run_config, dest, tokenizer)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the bpe and tiktoken tokenizers, the packed dataset and `k2 data`."""
    registry.register("tokenizer", "bpe", build_bpe, BpeOptions)
    registry.register("tokenizer", "tiktoken", build_tiktoken, TiktokenOptions)
    registry.register("command", "data", data_command)
    registry.register("dataset", "packed", build_packed, PackedOptions)
    registry.register("generator", "openai", build_openai_generator, OpenAIOptions)
    registry.register("synthesizer", "rephrase", build_rephrase_synthesizer)
    registry.register("synthesizer", "tool_use", build_tool_use_synthesizer)
    registry.register("command", "rephrase", rephrase_command)
    registry.register("command", "synth-tools", synth_tools_command)
    registry.register("generator", "k2", build_k2_generator, LocalOptions)
    registry.register("command", "serve", serve_command)
