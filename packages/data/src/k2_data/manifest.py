"""The one reader of a packed dataset's `manifest.json` (used by `k2 data`, the loader, rl).

Import-light (json and fsspec only): `k2 data stats` and the loader both read it without
pulling in the other's dependencies.
"""

from __future__ import annotations

import json
from typing import Any

from k2_core.errors import ConfigError

FORMAT = "k2-packed"
# 1: tokens + doc_starts; 2: adds the per-row document index `row_docs` (range reads)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
REQUIRED = ("seq_len", "eos_id", "vocab_size")


def reprepare_hint(uri: str) -> str:
    """The command that (re)builds a dataset at `uri`, for error messages."""
    return f"`k2 data prepare --out {uri}`"


def format_version(manifest: dict[str, Any]) -> int:
    """The layout version a manifest declares (no field: 1, the first layout)."""
    return int(manifest.get("version", 1))


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a complete packed dataset at `uri`; one-line ConfigError otherwise."""
    import fsspec

    uri = str(uri)
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        with fs.open(root.rstrip("/") + "/" + MANIFEST, "rb") as f:
            m = json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(
            f"{uri}: not a complete k2 packed dataset (manifest.json missing); "
            f"run {reprepare_hint(uri)} first"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{uri}: cannot read manifest.json ({exc})") from None
    if not isinstance(m, dict) or m.get("complete") is not True:
        raise ConfigError(
            f"{uri}: not a complete k2 packed dataset (manifest.json lacks "
            f"complete: true: incomplete or still being written); re-run "
            f"{reprepare_hint(uri)}"
        )
    if m.get("format") != FORMAT:
        raise ConfigError(f"{uri}: format {m.get('format')!r}, expected {FORMAT!r}")
    try:
        version = format_version(m)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{uri}: manifest.json has version {m.get('version')!r}, not an integer"
        ) from None
    if not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(
            f"{uri}: {FORMAT} version {version}, this k2-data reads versions 1 to "
            f"{FORMAT_VERSION}; upgrade k2-data or re-run {reprepare_hint(uri)}"
        )
    for key in REQUIRED:
        if key not in m:
            raise ConfigError(f"{uri}: manifest.json lacks {key!r}")
    return m
