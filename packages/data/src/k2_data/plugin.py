"""k2-data's registrations: the `tokenizer` implementations and the `k2 data` command.

Import-light on purpose: every `k2` command loads this module, so implementations are
registered as `"module:attr"` references (imported on first build) or import inside the factory:
tokenizers, zarr and numpy load only when used.
"""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .generators.local import LocalOptions
from .generators.openai_client import OpenAIOptions
from .loader_options import PackedOptions
from .tokenizer import BpeOptions, TiktokenOptions


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


@hookimpl
def k2_on_export(src: str, run_config: Any, dest: str, tokenizer: str | None) -> list[str]:
    """`k2 export-hf`: the checkpoint's tokenizer as HF files, with K2's chat template."""
    from .hf_export import export_tokenizer

    return export_tokenizer(src, run_config, dest, tokenizer)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register the bpe and tiktoken tokenizers, the packed dataset and `k2 data`."""
    registry.register(
        "tokenizer",
        "bpe",
        "k2_data.tokenizer:build_bpe",
        BpeOptions,
        doc="Byte-level BPE (HF tokenizers) trained on the sources, K2's chat/tool special tokens.",
    )
    registry.register(
        "tokenizer",
        "tiktoken",
        "k2_data.tokenizer:build_tiktoken",
        TiktokenOptions,
        doc="A tiktoken BPE file (e.g. K2's tiktoken.model) with K2's special-token ids.",
    )
    registry.register("command", "data", "k2_data.commands:data_command")
    registry.register(
        "dataset",
        "packed",
        "k2_data.loader:build_packed",
        PackedOptions,
        doc="Packed token sequences from `k2 data prepare` (default: the built-in "
        "corpus), resumable.",
    )
    registry.register(
        "generator",
        "openai",
        "k2_data.generators.openai_client:build_openai",
        OpenAIOptions,
        doc="Any OpenAI-compatible endpoint (vLLM, SGLang, k2 serve): "
        "retries, bounded concurrency.",
    )
    registry.register("synthesizer", "rephrase", build_rephrase_synthesizer)
    registry.register("synthesizer", "tool_use", build_tool_use_synthesizer)
    registry.register("command", "rephrase", "k2_data.rephrase.command:rephrase_command")
    registry.register("command", "synth-tools", "k2_data.synth_tools.command:synth_tools_command")
    registry.register(
        "generator",
        "k2",
        "k2_data.generators.local:build_local",
        LocalOptions,
        doc="A k2 checkpoint in this process: batched sampling with MLA's compressed KV cache.",
    )
    registry.register("command", "serve", "k2_data.inference.command:serve_command")
