"""Find the tokenizer a checkpoint was trained with."""

from __future__ import annotations

from typing import Any

from k2_core.errors import CheckpointError, K2Error

from ..tokenizer import META, Tokenizer, load_tokenizer


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def find_tokenizer(uri: str, run_cfg: Any, *, build_default: bool = True) -> Tokenizer:
    """`{uri}/tokenizer` when saved beside the weights, else the tokenizer of the checkpoint's
    dataset (run_config.data.options.uri, or the built-in default dataset when it has none,
    prepared first if missing unless not `build_default`)."""
    beside = f"{uri.rstrip('/')}/tokenizer"
    if _exists(f"{beside}/{META}"):
        return load_tokenizer(beside)
    if run_cfg is None:
        raise CheckpointError(
            f"{uri}: no tokenizer beside the weights and no run config naming a dataset; "
            "pass the tokenizer folder explicitly (--tokenizer URI)"
        )
    if run_cfg.data.dataset != "packed":
        raise CheckpointError(
            f"{uri}: trained on dataset {run_cfg.data.dataset!r}, whose tokenizer k2 cannot find; "
            "pass the tokenizer folder explicitly (--tokenizer URI)"
        )
    from ..loader import read_manifest

    data_uri = run_cfg.data.options.get("uri")
    try:
        if data_uri is None and build_default:
            from ..prepare import default_dataset_uri

            data_uri = default_dataset_uri()
        elif data_uri is None:
            from ..config import DataPrepareConfig, output_uri

            data_uri = output_uri(DataPrepareConfig())
        manifest = read_manifest(data_uri)
        tok_path = manifest.get("tokenizer", {}).get("path", "tokenizer")
        return load_tokenizer(f"{str(data_uri).rstrip('/')}/{tok_path}")
    except (K2Error, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{uri}: cannot load the tokenizer of its dataset {data_uri} ({exc}); "
            "pass the tokenizer folder explicitly (--tokenizer URI)"
        ) from None
