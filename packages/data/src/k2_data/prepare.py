"""`k2 data prepare`: read sources, tokenize in worker processes, pack into a zarr v3 store.

On-disk layout at OUT (the training loader reads exactly this):
    zarr.json                   zarr v3 group
    train/tokens                uint32 [n_seq, seq_len+1], chunks of whole rows (~8 MiB), raw
    train/doc_starts            int64 [n_docs]: offsets into the split's flattened token stream
    train/row_docs              int64 [n_seq+1]: row r's documents are
                                doc_starts[row_docs[r]:row_docs[r+1]] (the loader's range reads)
    val/...                     the same for the validation split
    tokenizer/                  the tokenizer (k2_tokenizer.json + tokenizer.json/.tiktoken)
    manifest.json               format "k2-packed" v2, counts, checksums; `complete: true`
                                is written last: a folder without it is not a dataset
    skipped.jsonl               when input was skipped: {reason, file, record, detail} a line
                                (the first SKIP_LOG_LIMIT skips; counts are all in the manifest)
    _work/                      while building: plan, per-shard committed outputs (resume)
OUT.lock (beside OUT, local filesystems) is held while building and removed when done.

The run is deterministic (same config -> same bytes, whatever `workers`) and resumable:
documents are read in a fixed order and cut into shards of `shard_docs`; each shard's tokens
are committed under _work/ (tokens first, its JSON last); a rerun re-reads the sources (to
rebuild the dedup set and counts) but tokenizes only uncommitted shards, then assembles.

A failed run removes what it created (never what was there before it started): bad input (a
ConfigError: no usable document, a missing source...) leaves nothing, since the input has to
change; any other failure (Ctrl-C, a worker that died, a full disk) keeps _work/ and
tokenizer/ when at least one shard was committed, so a rerun resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from k2_core.errors import ConfigError, K2Error

from . import _worker
from .config import DataPrepareConfig, output_uri
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, format_version, read_manifest  # noqa: F401
from .sources import Skips, iter_documents, skip
from .tokenizer import Tokenizer, load_tokenizer

WORK = "_work"
TOKENIZER_DIR = "tokenizer"
SKIP_LOG = "skipped.jsonl"
SKIP_LOG_LIMIT = 10_000
CHUNK_BYTES = 8 << 20


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write_json(fs: Any, path: str, obj: Any, compact: bool = False) -> None:
    # compact: the C encoder (indent= falls back to the pure-Python one); for _work files
    data = (
        json.dumps(obj, sort_keys=True, separators=(",", ":"))
        if compact
        else json.dumps(obj, indent=2, sort_keys=True)
    ).encode()
    with fs.open(path, "wb") as f:
        f.write(data)


def _uniform(digest: bytes, seed: int, salt: bytes) -> float:
    """A deterministic draw in [0, 1) from a document digest, the seed and a purpose."""
    h = hashlib.sha256(salt + seed.to_bytes(8, "little", signed=True) + digest).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64


def copies(digest: bytes, weight: float, seed: int) -> int:
    """How many times a document of mixture weight `weight` is taken."""
    whole = math.floor(weight)
    return whole + int(_uniform(digest, seed, b"repeat") < weight - whole)


class _NoProgress:
    """Stands in for a rich Progress when stderr is not a terminal (no import of rich)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    advance = update


def _progress() -> Any:
    forced = any(os.environ.get(k) for k in ("FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE"))
    if not forced and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return _NoProgress()  # rich would be disabled anyway: save its import
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )


# -- workers -------------------------------------------------------------------------------


def _encode_with(encode: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    flat, lengths = _worker.pack(encode(texts))
    return np.frombuffer(flat, dtype="<u4"), np.frombuffer(lengths, dtype="<i8")


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _import_in_background(module: str) -> None:
    """Import `module` in a daemon thread: its import cost overlaps the tokenization instead of
    adding to the serial assembly at the end (an error resurfaces at the real import)."""
    import threading

    def run() -> None:
        try:
            __import__(module)
        except Exception:
            pass

    threading.Thread(target=run, name=f"k2-import-{module}", daemon=True).start()


class _Encoder:
    """Encodes batches in worker processes (spawn) or in-process (workers=0)."""

    def __init__(self, tok: Tokenizer, workers: int):
        self.tok = tok
        self.pool = None
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, _cpus() // workers)
            name, state = tok.state()
            # spawn: no inherited locks or tokenizers thread pools; a worker that dies raises
            # BrokenProcessPool instead of hanging the run.
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context("spawn"),
                initializer=_worker.init,
                initargs=(name, state, threads),
            )
            # start every worker now: they load the tokenizer while the first batch is read
            for _ in range(workers):
                self.pool.submit(_worker.ping)
            self.encode = None
        else:
            self.encode = _worker.make_encoder(*tok.state())
        # a few batches per worker queued: none waits for the main process to read more
        self.max_inflight = max(2, 4 * workers)

    def submit(self, texts: list[str]) -> Any:
        if self.pool is None:
            return _encode_with(self.encode, texts)
        return self.pool.submit(_worker.encode, texts)

    @staticmethod
    def done(handle: Any) -> bool:
        return isinstance(handle, tuple) or handle.done()

    @staticmethod
    def result(handle: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(handle, tuple):
            return handle
        from concurrent.futures.process import BrokenProcessPool

        try:
            flat, lengths = handle.result()
            return np.frombuffer(flat, dtype="<u4"), np.frombuffer(lengths, dtype="<i8")
        except BrokenProcessPool:
            raise K2Error(
                "data prepare: a tokenizer worker process died (out of memory? "
                "a script read from stdin cannot spawn workers; try workers=0)"
            ) from None

    wait = result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# -- the build -----------------------------------------------------------------------------


def _build_tokenizer(cfg: DataPrepareConfig, skipped_sample: Counter) -> Tokenizer:
    from k2_core.registry import Registry

    name = cfg.tokenizer.name
    if name in ("bpe", "tiktoken"):  # ours: no need to load every plugin (torch) to find them
        from . import plugin

        registry = Registry()
        plugin.k2_register(registry)
    else:
        from k2_core.plugins import get_plugins

        registry = get_plugins().registry
    try:
        reg = registry.get("tokenizer", name)
    except Exception as e:
        raise ConfigError(f"tokenizer.name: {e.args[0] if e.args else e}") from None
    opts = registry.options("tokenizer", name, cfg.tokenizer.options, where="tokenizer.options")
    params = [
        p
        for p in inspect.signature(reg.factory).parameters.values()
        if p.name != "options" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        return reg.factory(options=opts)

    def sample() -> Iterator[str]:
        for i, d in enumerate(iter_documents(cfg, skipped_sample)):
            if i >= cfg.tokenizer_sample_docs:
                return
            yield d.text

    return reg.factory(sample(), options=opts)


def train_tokenizer(cfg: DataPrepareConfig, out: str) -> Tokenizer:
    """Build the config's tokenizer (training bpe on a sample of the sources), save to `out`."""
    tok = _build_tokenizer(cfg, Counter())
    tok.save(out)
    return tok


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}"


@dataclass
class _Shard:
    """A shard being built: its documents' (digest, domain), its encoder batches, whether full.

    `handles` is None for a shard an earlier (interrupted) run committed: only its documents'
    digests are needed (for dedup), nothing is encoded or committed again."""

    index: int
    meta: list[tuple[bytes, str]] = field(default_factory=list)
    handles: list[Any] | None = field(default_factory=list)
    closed: bool = False


def _stream(cfg: DataPrepareConfig, tok: Tokenizer, fs: Any, work: str) -> dict[str, Any]:
    """Read, dedup and tokenize every document into committed shards; returns the counts.

    One continuous pipeline: batches of `batch_docs` documents go to the workers as soon as
    they are read (the main process keeps reading while they encode), and shards are committed
    in order as soon as all their batches are back."""
    skipped = Skips(SKIP_LOG_LIMIT)
    seen: set[bytes] = set()
    duplicates = 0
    docs_read = 0
    n_shards = 0
    encoder = _Encoder(tok, cfg.workers)
    if cfg.workers > 0:
        _import_in_background("zarr")  # needed by _assemble; the main process mostly waits here
    pending: deque[_Shard] = deque()  # shards not yet committed, oldest first
    outstanding: deque[Any] = deque()  # batches submitted and not known to be finished

    def commit(shard: _Shard) -> None:
        idx, meta = shard.index, shard.meta
        parts = [encoder.result(h) for h in shard.handles or ()]
        flat = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint32)
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        base = f"{work}/{_shard_name(idx)}"
        with fs.open(f"{base}.tokens", "wb") as f:
            f.write(flat.astype("<u4", copy=False).tobytes())
        _write_json(
            fs,
            f"{base}.json",
            {
                "n_docs": len(meta),
                "n_tokens": int(flat.size),
                "digest": [d.hex() for d, _ in meta],
                "domain": [dom for _, dom in meta],
                "length": lengths.tolist(),
            },
            compact=True,
        )

    def drain(limit: int) -> None:
        """Wait until at most `limit` batches are in flight; commit finished shards in order."""
        while outstanding and (len(outstanding) > limit or encoder.done(outstanding[0])):
            encoder.wait(outstanding.popleft())
        while pending and pending[0].closed and all(encoder.done(h) for h in pending[0].handles):
            commit(pending.popleft())

    def new_shard() -> _Shard:
        nonlocal n_shards
        # committed by an earlier (interrupted) run: only its documents' hashes are needed
        skip = fs.exists(f"{work}/{_shard_name(n_shards)}.json")
        shard = _Shard(n_shards, handles=None if skip else [])
        n_shards += 1
        if not skip:
            pending.append(shard)
        return shard

    def flush_batch(shard: _Shard, texts: list[str]) -> None:
        if shard.handles is not None and texts:
            h = encoder.submit(texts)
            shard.handles.append(h)
            outstanding.append(h)
        drain(encoder.max_inflight)

    try:
        with _progress() as prog:
            task = prog.add_task("tokenizing documents", total=None)
            shard: _Shard | None = None
            texts: list[str] = []
            for doc in iter_documents(cfg, skipped):
                docs_read += 1
                try:
                    raw = doc.text.encode("utf-8")
                except UnicodeEncodeError:
                    skip(
                        skipped,
                        "invalid_utf8",
                        f"domain:{doc.domain}",
                        f"doc {doc.id}",
                        detail="lone surrogates",
                    )
                    continue
                dg = hashlib.sha256(raw).digest()[:16]
                if dg in seen:
                    duplicates += 1
                    continue
                seen.add(dg)
                if shard is None:
                    shard = new_shard()
                shard.meta.append((dg, doc.domain))
                if shard.handles is not None:
                    texts.append(doc.text)
                    if len(texts) == cfg.batch_docs:
                        flush_batch(shard, texts)
                        texts = []
                if len(shard.meta) == cfg.shard_docs:
                    shard.closed = True  # committed as soon as its batches are back
                    flush_batch(shard, texts)
                    texts = []
                    shard = None
                    prog.update(task, completed=docs_read)
            if shard is not None:
                shard.closed = True
                flush_batch(shard, texts)
            drain(0)
            assert not pending
    finally:
        encoder.close()
    return {
        "n_shards": n_shards,
        "skipped": dict(sorted(skipped.items())),
        "skip_log": skipped.entries,
        "skips_not_logged": skipped.not_logged,
        "duplicates": duplicates,
        "documents_unique": len(seen),
    }


class _SplitWriter:
    """Streams token entries into `<split>/tokens` rows of seq_len+1, whole chunks at a time."""

    def __init__(self, root: Any, split: str, row: int, n_seq: int):
        self.row = row
        self.n_seq = n_seq
        self.chunk_rows = max(1, CHUNK_BYTES // (row * 4))
        group = root.require_group(split)
        self.tokens = group.create_array(
            "tokens",
            shape=(n_seq, row),
            dtype="uint32",
            chunks=(min(self.chunk_rows, max(n_seq, 1)), row),
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
        self.group = group
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.rows_done = 0
        self.crc = 0

    def add(self, toks: np.ndarray) -> None:
        if self.rows_done >= self.n_seq:
            return
        self.buf.append(toks)
        self.buffered += toks.size
        if self.buffered >= self.chunk_rows * self.row:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        flat = np.concatenate(self.buf)
        rows = min(flat.size // self.row, self.n_seq - self.rows_done)
        if not final:
            rows = min(rows, (rows // self.chunk_rows) * self.chunk_rows) or rows
        if rows > 0:
            block = flat[: rows * self.row].reshape(rows, self.row)
            self.tokens[self.rows_done : self.rows_done + rows] = block
            self.crc = zlib.crc32(block.astype("<u4", copy=False).tobytes(), self.crc)
            self.rows_done += rows
        rest = flat[rows * self.row :]
        self.buf = [rest] if rest.size and self.rows_done < self.n_seq else []
        self.buffered = rest.size if self.buf else 0

    def close(self, doc_starts: np.ndarray) -> dict[str, int]:
        self._flush(final=True)
        assert self.rows_done == self.n_seq, (self.rows_done, self.n_seq)
        ds = self.group.create_array(
            "doc_starts",
            shape=doc_starts.shape,
            dtype="int64",
            chunks=(max(1, min(1 << 20, doc_starts.size)),),
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
        if doc_starts.size:
            ds[...] = doc_starts
        # row r's documents: doc_starts[row_docs[r]:row_docs[r+1]], so a reader of a few rows
        # reads a few document starts instead of the whole array
        row_docs = np.searchsorted(
            doc_starts, np.arange(self.n_seq + 1, dtype=np.int64) * self.row, side="left"
        ).astype(np.int64)
        rd = self.group.create_array(
            "row_docs",
            shape=row_docs.shape,
            dtype="int64",
            chunks=(min(1 << 20, row_docs.size),),
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
        rd[...] = row_docs
        return {
            "tokens": self.crc,
            "doc_starts": zlib.crc32(doc_starts.astype("<i8").tobytes()),
            "row_docs": zlib.crc32(row_docs.astype("<i8").tobytes()),
        }


def _assemble(
    cfg: DataPrepareConfig, tok: Tokenizer, out: str, fs: Any, root_path: str, n_shards: int
) -> dict[str, Any]:
    import zarr

    work = f"{root_path}/{WORK}"
    row = cfg.seq_len + 1
    metas = []
    for i in range(n_shards):
        m = _read_json(fs, f"{work}/{_shard_name(i)}.json")
        if m is None:
            raise ConfigError(f"{out}: work shard {i} missing; remove {out} and rerun")
        metas.append(m)
    lengths = np.array([x for m in metas for x in m["length"]], dtype=np.int64)
    digests = [bytes.fromhex(x) for m in metas for x in m["digest"]]
    domains = [x for m in metas for x in m["domain"]]
    offsets = (
        np.concatenate(
            [
                np.concatenate([[0], np.cumsum(m["length"])[:-1]]).astype(np.int64)
                if m["n_docs"]
                else np.zeros(0, np.int64)
                for m in metas
            ]
        )
        if metas
        else np.zeros(0, np.int64)
    )
    n = len(digests)
    if n == 0:
        raise ConfigError(f"{out}: empty result: no usable document in the sources")
    u_val = np.array([_uniform(d, cfg.seed, b"val") for d in digests])
    count = np.array(
        [copies(d, cfg.weight(dom), cfg.seed) for d, dom in zip(digests, domains, strict=True)]
    )
    is_val = u_val < cfg.val_fraction
    if cfg.val_fraction > 0:  # tiny corpora: hold out documents until val has one row
        for j in np.argsort(u_val, kind="stable"):
            if int((lengths[is_val] + 1).sum()) >= row or is_val.sum() >= n - 1:
                break
            is_val[j] = True
    starts = np.cumsum(np.concatenate([[0], [m["n_docs"] for m in metas]]))

    train_entries: list[tuple[int, np.ndarray]] = []  # (shard, doc indices into the shard)
    for p in range(int(count.max(initial=0))):
        for s in range(n_shards):
            k = metas[s]["n_docs"]
            perm = np.random.default_rng([cfg.seed, s, p]).permutation(k)
            g = starts[s] + perm
            keep = perm[(~is_val[g]) & (count[g] > p)]
            if keep.size:
                train_entries.append((s, keep))
    val_entries = []
    for s in range(n_shards):
        idx = np.arange(metas[s]["n_docs"])
        keep = idx[is_val[starts[s] + idx]]
        if keep.size:
            val_entries.append((s, keep))

    zroot = zarr.open_group(out, mode="a")
    eos = np.array([tok.eos_id], dtype=np.uint32)
    cache: dict[int, np.ndarray] = {}

    def shard_tokens(s: int) -> np.ndarray:
        if s not in cache:
            cache.clear()
            with fs.open(f"{work}/{_shard_name(s)}.tokens", "rb") as f:
                cache[s] = np.frombuffer(f.read(), dtype="<u4").astype(np.uint32, copy=False)
        return cache[s]

    splits: dict[str, Any] = {}
    checksums: dict[str, int] = {}
    documents: dict[str, int] = {}
    with _progress() as prog:
        for split, entries in (("train", train_entries), ("val", val_entries)):
            total = sum(int((lengths[starts[s] + e] + 1).sum()) for s, e in entries)
            n_seq = total // row
            if split == "train" and n_seq == 0:
                raise ConfigError(
                    f"{out}: empty result: {total} train tokens, fewer than one sequence of "
                    f"seq_len+1 = {row}"
                )
            writer = _SplitWriter(zroot, split, row, n_seq)
            kept = n_seq * row
            doc_starts: list[int] = []
            per_domain: Counter = Counter()
            pos = 0
            task = prog.add_task(f"packing {split}", total=len(entries))
            for s, e in entries:
                toks = shard_tokens(s)
                for j in e.tolist():
                    g = starts[s] + j
                    ln = int(lengths[g])
                    if pos < kept:
                        doc_starts.append(pos)
                        o = int(offsets[g])
                        writer.add(toks[o : o + ln])
                        writer.add(eos)
                    per_domain[domains[g]] += ln + 1
                    pos += ln + 1
                prog.advance(task)
            sums = writer.close(np.array(doc_starts, dtype=np.int64))
            checksums.update({f"{split}/{k}": v for k, v in sums.items()})
            splits[split] = {
                "n_sequences": n_seq,
                "n_tokens": kept,
                "n_documents": len(doc_starts),
                "dropped_tail_tokens": total - kept,
                "tokens_per_domain": dict(sorted(per_domain.items())),
            }
            documents[split] = int(is_val.sum()) if split == "val" else int((~is_val).sum())
    per_domain_all: Counter = Counter()
    for sp in splits.values():
        per_domain_all.update(sp["tokens_per_domain"])
    return {
        "splits": splits,
        "checksums": checksums,
        "documents": documents,
        "tokens_per_domain": dict(sorted(per_domain_all.items())),
    }


def _check_out(fs: Any, root: str, out: str, chash: str) -> str:
    """'done' if a complete dataset of this config is at OUT, else 'resume' or 'fresh'."""
    manifest = _read_json(fs, f"{root}/{MANIFEST}")
    if manifest is not None and manifest.get("complete"):
        if manifest.get("config_hash") == chash and format_version(manifest) >= FORMAT_VERSION:
            return "done"
        if manifest.get("config_hash") == chash:  # an older layout of this config: rebuild it
            fs.rm(root, recursive=True)
            return "fresh"
        raise ConfigError(
            f"{out}: holds a dataset of another config ({manifest.get('config_hash')}); "
            "remove it or choose another --out"
        )
    plan = _read_json(fs, f"{root}/{WORK}/plan.json")
    if plan is not None and plan.get("config_hash") == chash:
        return "resume"
    if fs.exists(root):
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        ours = {WORK, TOKENIZER_DIR, "train", "val", "zarr.json", MANIFEST, SKIP_LOG}
        if entries and not set(entries) <= ours:
            raise ConfigError(f"{out}: exists and is not a k2 dataset; choose another --out")
        if entries:
            fs.rm(root, recursive=True)
    return "fresh"


@contextlib.contextmanager
def _exclusive(fs: Any, root: str) -> Iterator[None]:
    """Hold `<root>.lock` on a local filesystem, so ranks of one job that all find the dataset
    missing build it once: the first builds, the others wait and then find it complete. The
    holder removes the file before unlocking; a waiter that then gets the lock of a removed
    file locks the path anew, so no two processes ever hold the lock of one path."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield  # remote stores: one preparing process per output is the caller's business
        return
    import fcntl

    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    lock = f"{root}.lock"
    while True:
        f = open(lock, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            f.close()
            raise
        f.close()  # the previous holder removed it meanwhile: lock the path anew
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _entries(fs: Any, root: str) -> set[str] | None:
    """Names directly under `root`, or None when it does not exist."""
    if not fs.exists(root):
        return None
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}


def _clean_failed(fs: Any, root: str, out: str, before: set[str] | None, exc: BaseException) -> str:
    """Remove what a failed build created under `root` (nothing that was there before it);
    keep _work/ and tokenizer/ when a shard was committed and the failure was not bad input.
    Returns a one-line account of what was kept, or ''."""
    now = _entries(fs, root)
    if now is None:
        return ""
    created = now - (before or set())
    keep: set[str] = set()
    if not isinstance(exc, ConfigError) and WORK in now:
        shards = [
            p
            for p in fs.ls(f"{root}/{WORK}", detail=False)
            if p.endswith(".json") and p.rstrip("/").rsplit("/", 1)[-1].startswith("shard-")
        ]
        if shards:
            keep = {WORK, TOKENIZER_DIR}
    for name in sorted(created - keep):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{root}/{name}", recursive=True)
    if before is None and not keep:
        with contextlib.suppress(OSError):
            if not fs.ls(root, detail=False):
                fs.rmdir(root)
    if keep & now:
        return (
            f"{out}: partial build kept in {WORK}/ (committed shards); rerun the same "
            "command to resume, or remove the folder"
        )
    return ""


def prepare(cfg: DataPrepareConfig, *, quiet: bool = True) -> str:
    """Build (or resume, or reuse) the packed dataset of `cfg`; returns its URI."""
    return prepare_or_reuse(cfg, quiet=quiet)[0]


def prepare_or_reuse(cfg: DataPrepareConfig, *, quiet: bool = True) -> tuple[str, bool]:
    """(URI, whether this call built it): a complete dataset of `cfg` is reused as it is."""
    out = output_uri(cfg)
    fs, root = _fs(out)
    with _exclusive(fs, root):
        state = _check_out(fs, root, out, cfg.config_hash())
        before = _entries(fs, root)
        try:
            return _prepare(cfg, quiet, out, fs, root, state), state != "done"
        except BaseException as exc:
            try:
                kept = _clean_failed(fs, root, out, before, exc)
            except Exception:  # cleaning up must not hide why the run failed
                kept = ""
            if kept and isinstance(exc, K2Error):  # one line: the error, then what was kept
                raise type(exc)(f"{exc.args[0] if exc.args else exc}; {kept}") from None
            if kept and isinstance(exc, KeyboardInterrupt):  # `k2: interrupted; <kept>`
                raise KeyboardInterrupt(kept) from None
            if kept:
                print(f"k2 data prepare: {kept}", file=sys.stderr)
            raise


def _prepare(cfg: DataPrepareConfig, quiet: bool, out: str, fs: Any, root: str, state: str) -> str:
    chash = cfg.config_hash()
    if state == "done":
        if fs.exists(f"{root}/{WORK}"):
            fs.rm(f"{root}/{WORK}", recursive=True)
        return out
    t0 = time.perf_counter()
    work = f"{root}/{WORK}"
    fs.makedirs(work, exist_ok=True)
    if state == "fresh":
        _write_json(fs, f"{work}/plan.json", {"config_hash": chash, "config": cfg.identity()})
    tok_uri = f"{out}/{TOKENIZER_DIR}"
    if fs.exists(f"{work}/tokenizer.done"):
        tok = load_tokenizer(tok_uri)
    else:
        tok = _build_tokenizer(cfg, Counter())
        tok.save(tok_uri)
        with fs.open(f"{work}/tokenizer.done", "wb") as f:
            f.write(tok.content_hash.encode())
    if tok.vocab_size > 2**32:
        raise ConfigError("tokenizer vocabulary does not fit uint32")
    counts = _stream(cfg, tok, fs, work)
    packed = _assemble(cfg, tok, out, fs, root, counts["n_shards"])
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "vocab_size": tok.vocab_size,
        "tokenizer": {
            "name": tok.name,
            "content_hash": tok.content_hash,
            "path": TOKENIZER_DIR,
            "special_tokens": tok.special_tokens
            if len(tok.special_tokens) < 64
            else {k: v for k, v in tok.special_tokens.items() if "reserved" not in k},
        },
        "config": cfg.identity(),
        "config_hash": chash,
        "sources": [s.describe() for s in cfg.sources],
        "weights": {s.domain: cfg.weight(s.domain) for s in cfg.sources},
        "splits": packed["splits"],
        "tokens_per_domain": packed["tokens_per_domain"],
        "documents": {"unique": counts["documents_unique"], **packed["documents"]},
        "duplicates": counts["duplicates"],
        "skipped": counts["skipped"],
        **(
            {
                "skip_log": {
                    "path": SKIP_LOG,
                    "entries": len(counts["skip_log"]),
                    "not_logged": counts["skips_not_logged"],
                }
            }
            if counts["skip_log"]
            else {}
        ),
        "checksums": packed["checksums"],
        "complete": True,
    }
    if counts["skip_log"]:
        with fs.open(f"{root}/{SKIP_LOG}", "wb") as f:
            f.write(
                "".join(
                    json.dumps(e, ensure_ascii=False) + "\n" for e in counts["skip_log"]
                ).encode()
            )
    _write_json(fs, f"{root}/{MANIFEST}", manifest)
    fs.rm(work, recursive=True)
    if not quiet:
        print(f"prepared {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def default_dataset_uri() -> str:
    """The packed built-in corpus in the cache folder, built first if missing."""
    return prepare(DataPrepareConfig())


def read_skip_log(uri: str, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The skip log of a prepared dataset ({reason, file, record?, detail?} each); [] if none."""
    m = manifest if manifest is not None else read_manifest(uri)
    log = m.get("skip_log")
    if not log:
        return []
    fs, root = _fs(uri)
    try:
        with fs.open(f"{root}/{log['path']}", "rb") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    except (FileNotFoundError, ValueError):
        return []


def inspect_dataset(
    uri: str, n: int = 3, split: str = "train", marker: str = "\u2016"
) -> list[str]:
    """The first `n` sequences of `split`, decoded, with `marker` at each document start."""
    import zarr

    m = read_manifest(uri)
    tok = load_tokenizer(f"{uri.rstrip('/')}/{m['tokenizer']['path']}")
    g = zarr.open_group(uri, mode="r")[split]
    tokens = g["tokens"]
    starts = np.asarray(g["doc_starts"][...])
    row = m["seq_len"] + 1
    out = []
    for i in range(min(n, tokens.shape[0])):
        seq = np.asarray(tokens[i]).tolist()
        cuts = [int(s) - i * row for s in starts if i * row <= s < (i + 1) * row]
        bounds = sorted({0, *cuts, row})
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            pieces.append((marker if a in cuts else "") + tok.decode(seq[a:b]))
        out.append("".join(pieces))
    return out
