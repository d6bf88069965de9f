"""Documents from fsspec URIs and globs (JSON Lines plain/.gz/.zst, Parquet, text) or the
built-in corpus. Bad input is counted by reason in a `Counter` and skipped, never fatal.

Reasons: unreadable (file cannot be opened/decompressed/parsed), invalid_json, invalid_utf8,
missing_field, not_text (field is not a string), empty, too_long (over max_chars). When the
counter is a `Skips`, each skip is also logged with its file and record (`k2 data prepare`
writes that log to OUT/skipped.jsonl).
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator

from k2_core.errors import ConfigError, K2Error

from .config import DataPrepareConfig, SourceConfig
from .documents import Document


class Skips(Counter):
    """Skipped-input counts by reason, plus where the first `limit` skips happened: entries
    {"reason", "file", "record" (e.g. "line 3", "row 7", "doc ID"; absent for a whole file),
    "detail" (why a file is unreadable)}. `not_logged` counts the skips past `limit`."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.limit = limit
        self.entries: list[dict[str, str]] = []
        self.not_logged = 0

    def note(
        self,
        reason: str,
        file: str,
        record: str | None = None,
        detail: str | None = None,
        n: int = 1,
    ) -> None:
        self[reason] += n
        if len(self.entries) >= self.limit:
            self.not_logged += n
            return
        entry = {"reason": reason, "file": file}
        if record is not None:
            entry["record"] = record
        if detail:
            entry["detail"] = detail
        if n != 1:
            entry["count"] = n  # type: ignore[assignment]
        self.entries.append(entry)


def skip(
    skipped: Counter,
    reason: str,
    file: str,
    record: str | None = None,
    detail: str | None = None,
    n: int = 1,
) -> None:
    """Count one skip (`n` records) by reason; log where it happened when `skipped` is a Skips."""
    if isinstance(skipped, Skips):
        skipped.note(reason, file, record, detail, n)
    else:
        skipped[reason] += n


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def expand(source: SourceConfig) -> list[str]:
    """Sorted fully-qualified URIs of the files a `files` source names; ConfigError if none."""
    try:
        fs, path = _fs(source.uri or "")
    except (ImportError, ValueError) as e:
        raise ConfigError(f"source {source.uri}: {e}") from None
    if any(c in path for c in "*?["):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith("."))
    elif fs.exists(path):
        paths = [path]
    else:
        paths = []
    if not paths:
        raise ConfigError(f"source {source.uri}: no file matches")
    return [fs.unstrip_protocol(p) for p in paths]


def file_format(uri: str, fmt: str) -> str:
    """The format of `uri` (`fmt` unless auto)."""
    if fmt != "auto":
        return fmt
    name = uri.lower()
    for ext in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(ext)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def _open_bytes(uri: str) -> io.BufferedIOBase:
    """A decompressing binary stream over `uri` (.gz, .zst by extension)."""
    import fsspec

    raw = fsspec.open(uri, "rb").open()
    low = uri.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if low.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return raw


def _jsonl(uri: str, src: SourceConfig, skipped: Counter) -> Iterator[tuple[str, str]]:
    f = _open_bytes(uri)
    try:
        lines = io.BufferedReader(f, 1 << 20) if not isinstance(f, io.BufferedReader) else f
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skip(skipped, "invalid_utf8", uri, f"line {n}")
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skip(skipped, "invalid_json", uri, f"line {n}")
                continue
            if not isinstance(rec, dict) or src.text_field not in rec:
                skip(skipped, "missing_field", uri, f"line {n}")
                continue
            text = rec[src.text_field]
            if not isinstance(text, str):
                skip(skipped, "not_text", uri, f"line {n}")
                continue
            did = rec.get(src.id_field)
            yield (str(did) if did is not None else f"{uri}:{n}"), text
    finally:
        f.close()


def _parquet(uri: str, src: SourceConfig, skipped: Counter) -> Iterator[tuple[str, str]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if src.text_field not in names:
            skip(
                skipped,
                "missing_field",
                uri,
                detail=f"no column {src.text_field!r}",
                n=pf.metadata.num_rows,
            )
            return
        cols = [src.text_field] + ([src.id_field] if src.id_field in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
            for text, did in zip(texts, ids, strict=True):
                row += 1
                if text is None:
                    skip(skipped, "missing_field", uri, f"row {row}")
                    continue
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        skip(skipped, "invalid_utf8", uri, f"row {row}")
                        continue
                if not isinstance(text, str):
                    skip(skipped, "not_text", uri, f"row {row}")
                    continue
                yield (str(did) if did is not None else f"{uri}:{row}"), text


def _text(uri: str, src: SourceConfig, skipped: Counter) -> Iterator[tuple[str, str]]:
    f = _open_bytes(uri)
    try:
        data = f.read()
    finally:
        f.close()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skip(skipped, "invalid_utf8", uri)
        return
    yield uri, text


_READERS = {"jsonl": _jsonl, "parquet": _parquet, "text": _text}


def read_file(uri: str, src: SourceConfig, skipped: Counter) -> Iterator[tuple[str, str]]:
    """(id, text) of every record of one file; an unreadable file counts once and stops."""
    reader = _READERS[file_format(uri, src.format)]
    try:
        yield from reader(uri, src, skipped)
    except K2Error:
        raise
    except Exception as e:  # OSError, EOFError, zlib.error, ZstdError, ArrowInvalid, ...
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        skip(skipped, "unreadable", uri, detail=why)


def builtin(src: SourceConfig, seed: int) -> Iterator[Document]:
    """Documents of the built-in corpus domain `src.domain`."""
    try:
        from .corpus import builtin_documents
    except ImportError as e:
        raise ConfigError(
            f"builtin source {src.domain}: k2_data.corpus unavailable ({e})"
        ) from None
    yield from builtin_documents(src.domain, split="train", seed=seed, scale=src.scale)


def read_source(src: SourceConfig, seed: int, skipped: Counter) -> Iterator[Document]:
    """Every raw document of one source (not yet filtered by size)."""
    for _, d in _read_source(src, seed, skipped):
        yield d


def _read_source(src: SourceConfig, seed: int, skipped: Counter) -> Iterator[tuple[str, Document]]:
    """(file, document) of every raw document of one source."""
    if src.kind == "builtin":
        where = f"builtin:{src.domain}"
        for d in builtin(src, seed):
            yield where, d if d.domain == src.domain else Document(d.id, d.text, src.domain)
        return
    for uri in expand(src):
        for did, text in read_file(uri, src, skipped):
            yield uri, Document(did, text, src.domain)


def iter_documents(cfg: DataPrepareConfig, skipped: Counter) -> Iterator[Document]:
    """Documents of every source with weight > 0, round-robin one at a time (domains mix),
    without empty or over-long ones (counted in `skipped`)."""
    # Expand every files source first: a missing one fails before any work starts.
    for s in cfg.sources:
        if s.kind == "files" and cfg.weight(s.domain) > 0:
            expand(s)
    iters = [_read_source(s, cfg.seed, skipped) for s in cfg.sources if cfg.weight(s.domain) > 0]
    while iters:
        alive = []
        for it in iters:
            item = next(it, None)
            if item is None:
                continue
            alive.append(it)
            where, d = item
            if not d.text.strip():
                skip(skipped, "empty", where, f"doc {d.id}")
            elif len(d.text) > cfg.max_chars:
                skip(skipped, "too_long", where, f"doc {d.id}", detail=f"{len(d.text):,} chars")
            else:
                yield d
        iters = alive
