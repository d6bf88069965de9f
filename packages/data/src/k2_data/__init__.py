"""k2_data: sources over fsspec, tokenizers, packing into zarr, generation and synthesis."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

__all__ = [
    "BpeTokenizer",
    "DataPrepareConfig",
    "Document",
    "SourceConfig",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "default_dataset_uri",
    "inspect_dataset",
    "load_prepare_config",
    "load_tokenizer",
    "prepare",
    "read_manifest",
    "__version__",
    "Engine",
    "SamplingParams",
    "Completion",
    "render_chat",
    "encode_chat",
    "parse_assistant",
    "RephraseConfig",
    "run_rephrase",
    "SynthToolsConfig",
    "run_synth_tools",
    "read_outputs",
    "read_skip_log",
    "CHAT_TEMPLATE",
]

_LAZY = {
    "BpeTokenizer": "tokenizer",
    "TiktokenTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "DataPrepareConfig": "config",
    "SourceConfig": "config",
    "TokenizerConfig": "config",
    "load_prepare_config": "config",
    "Document": "documents",
    "default_dataset_uri": "prepare",
    "inspect_dataset": "prepare",
    "prepare": "prepare",
    "read_manifest": "prepare",
    "read_skip_log": "prepare",
    "CHAT_TEMPLATE": "chat",
    "Engine": "generation.engine",
    "SamplingParams": "generation.engine",
    "Completion": "generation.engine",
    "encode_chat": "chat",
    "parse_assistant": "chat",
    "RephraseConfig": "rephrase.config",
    "run_rephrase": "rephrase",
    "SynthToolsConfig": "synth_tools.config",
    "run_synth_tools": "synth_tools",
    "read_outputs": "pipeline.store",
}
_RENAMED = {"render_chat": ("chat", "render")}


def __getattr__(name: str) -> Any:  # lazy: `import k2_data` stays cheap for the plugin loader
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _RENAMED:
        import importlib

        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)
