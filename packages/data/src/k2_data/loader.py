"""The stateful loader over a packed dataset (`dataset` slot, name `packed`).

On-disk contract (written by `k2 data prepare`, format `k2-packed` version 2): a zarr v3 group
at `uri` (any fsspec URI) with subgroups `train` and `val`, each holding

- `tokens`     uint32 [n_seq, seq_len + 1], chunked in whole rows;
- `doc_starts` int64 [n_docs], offsets into the split's flattened token stream
  (`tokens.reshape(-1)`, row after row) where each document begins;
- `row_docs`   int64 [n_seq + 1]: the documents starting in row r are
  `doc_starts[row_docs[r]:row_docs[r + 1]]` (version 1 stores lack it: their `doc_starts`
  are read whole, as before);

and `uri/manifest.json` (read by `k2_data.manifest.read_manifest`).

Memory and start-up time do not grow with the corpus. The shuffle is a keyed bijection
(`KeyedPermutation`) evaluated at just the positions of each batch; rows and their document
starts are read as byte ranges of the raw (uncompressed) chunk files, so a shuffled epoch reads
about the bytes it uses. Arrays zarr has to decode (compressed, sharded) are read through zarr.

Each epoch visits the sequences in a permutation keyed by (seed, epoch). A global batch is
`world_size * batch_size` consecutive sequences of that permutation; rank r takes rows
`[r * batch_size, (r + 1) * batch_size)` of it, so across ranks every sequence is seen exactly
once per epoch (the ragged tail is dropped with `drop_last`). Iteration never ends: epochs
follow each other. `state_dict()` counts *consumed* batches (not prefetched ones) as a position
in global sequences, so a resume — even on another world size, when the position is a multiple
of the new global batch — continues exactly where the run stopped.

    from k2_data.loader import PackedOptions, PackedDataset
    loader = PackedDataset(PackedOptions(uri="./data/tiny", batch_size=8, doc_mask=True))
    batch = next(iter(loader))   # input_ids, labels, segment_ids, position_ids: [8, seq_len] int64
    state = loader.state_dict()  # JSON; later: loader.load_state_dict(state)
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from typing import Any

import numpy as np
import torch
from k2_core.errors import ConfigError

from .loader_options import PackedOptions
from .manifest import FORMAT, format_version, read_manifest, reprepare_hint

__all__ = [
    "KeyedPermutation",
    "PackedDataset",
    "PackedOptions",
    "STATE_VERSION",
    "build_packed",
    "make_loader",
    "read_manifest",
]

# 2: the shuffle is KeyedPermutation (version 1 drew numpy's PCG64 permutation)
STATE_VERSION = 2


def _default_uri() -> str:
    try:
        from .prepare import default_dataset_uri
    except ImportError as exc:
        raise ConfigError(f"no dataset uri given and no default is available ({exc})") from None
    return str(default_dataset_uri())


# --- the shuffle ------------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (for the round keys)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy array arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class KeyedPermutation:
    """A bijection of range(n) keyed by (seed, epoch), evaluated only where it is asked.

    A Feistel network over the smallest power of two >= n (at least 4), cycle-walked back into
    range(n): O(1) memory, under two passes per position on average, integer numpy arithmetic
    only, so every process on every platform computes the same order.
    """

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        # unequal halves are fine: each round maps (high, low) to (low, high ^ F(low)), a
        # bijection of the b-bit domain whatever the split, and the halves swap roles each round
        hi, lo = bits // 2, bits - bits // 2
        base = _mix64(_mix64((seed % 2**64) ^ 0x6A09E667F3BCC909) ^ (epoch % 2**64))
        self._rounds_consts = []  # (key, low bits, low mask, high bits, 64 - high bits) per round
        for r in range(_ROUNDS):
            key = _mix64(base + (r + 1) * 0x9E3779B97F4A7C15)
            self._rounds_consts.append(
                tuple(np.uint64(v) for v in (key, lo, (1 << lo) - 1, hi, 64 - hi))
            )
            hi, lo = lo, hi
        self._n = np.uint64(n)

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        for key, lo, mask, hi, drop in self._rounds_consts:
            f = _mix64_np(x & mask ^ key) >> drop  # the top `hi` bits of the hash: the best mixed
            x = ((x & mask) << hi) | ((x >> lo) ^ f)
        return x

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The sequence index at each of `positions` (all in [0, n)), as int64."""
        x = self._rounds(np.asarray(positions, dtype=np.uint64))
        walk = np.flatnonzero(x >= self._n)
        while walk.size:  # cycle walking: out-of-range values go round again until they land
            y = self._rounds(x[walk])
            x[walk] = y
            walk = walk[y >= self._n]
        return x.astype(np.int64)


# --- reading the store ------------------------------------------------------------------------


def _expand(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The indices of the spans [lo[i], hi[i]) one after another."""
    counts = hi - lo
    before = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.repeat(lo - before, counts) + np.arange(int(counts.sum()), dtype=np.int64)


class _Array:
    """Spans [lo, hi) of an array's leading axis, one after another."""

    bytes_read = 0  # bytes fetched by byte range (only _RawArray reads that way)

    def spans(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.spans(idx, idx + 1)


class _MemArray(_Array):
    """The whole array in memory."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.data[idx]

    def spans(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.data[_expand(lo, hi)]


class _ZarrArray(_Array):
    """Through zarr, for chunks it has to decode: every chunk touched is read whole."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.tail = (slice(None),) * (arr.ndim - 1)

    def spans(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        idx = _expand(lo, hi)
        if idx.size == 0:
            return np.empty((0, *self.arr.shape[1:]), dtype=self.arr.dtype)
        a, b = int(idx.min()), int(idx.max()) + 1
        if b - a == idx.size:  # a contiguous block (no shuffle): one chunk-aligned slice
            return np.asarray(self.arr[a:b])[idx - a]
        uniq, inv = np.unique(idx, return_inverse=True)
        return np.asarray(self.arr.get_orthogonal_selection((uniq, *self.tail)))[inv]


def _raw_layout(arr: Any) -> tuple[int, np.dtype] | None:
    """(entries per chunk, on-disk dtype) when each chunk file holds its entries' raw bytes."""
    try:
        from zarr.codecs import BytesCodec

        md = arr.metadata
        if md.zarr_format != 3 or getattr(md, "storage_transformers", ()):
            return None
        codecs = tuple(md.codecs)
        chunks = tuple(arr.chunks)
    except Exception:  # noqa: BLE001 - an unknown layout is read through zarr
        return None
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None  # compressed, checksummed or sharded: only zarr can decode it
    if chunks[1:] != tuple(arr.shape[1:]):
        return None  # not whole rows per chunk
    dtype = np.dtype(arr.dtype)
    if dtype.itemsize > 1:
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return chunks[0], dtype


class _RawArray(_Array):
    """Uncompressed chunk files read as byte ranges: exactly the bytes asked for.

    Local files are read with os.pread (no buffered read-ahead); other filesystems with
    fsspec's `cat_ranges` (concurrent ranged GETs on object stores).
    """

    def __init__(self, fs: Any, path: str, arr: Any, chunk_len: int, dtype: np.dtype) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.path = fs, path
        self.inner = tuple(arr.shape[1:])
        self.chunk_len, self.dtype = chunk_len, dtype
        self.entry = dtype.itemsize * math.prod(self.inner)  # bytes per leading-axis entry
        self.fill = np.asarray(arr.metadata.fill_value, dtype=dtype).tobytes()
        self._key = arr.metadata.encode_chunk_key
        self._local = type(fs) is LocalFileSystem  # subclasses (e.g. counting ones) use fsspec
        self.bytes_read = 0

    def spans(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        cl, e = self.chunk_len, self.entry
        pieces: list[list[int]] = []  # [chunk, first byte, end byte], in output order
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            while a < b:
                c = a // cl
                end = min(b, (c + 1) * cl)
                first, last = (a - c * cl) * e, (end - c * cl) * e
                if pieces and pieces[-1][0] == c and pieces[-1][2] == first:
                    pieces[-1][2] = last  # continues the previous piece (consecutive rows)
                else:
                    pieces.append([c, first, last])
                a = end
        data = b"".join(self._read(pieces))
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self.inner)

    def _read(self, pieces: list[list[int]]) -> list[bytes]:
        zeros = (0,) * len(self.inner)
        paths = [f"{self.path}/{self._key((c, *zeros))}" for c, _, _ in pieces]
        if self._local:
            out: list[Any] = []
            fds: dict[str, int] = {}
            try:
                for p, (_, first, last) in zip(paths, pieces, strict=True):
                    if p not in fds:
                        try:
                            fds[p] = os.open(p, os.O_RDONLY)
                        except FileNotFoundError:
                            fds[p] = -1
                    out.append(os.pread(fds[p], last - first, first) if fds[p] >= 0 else None)
            finally:
                for fd in fds.values():
                    if fd >= 0:
                        os.close(fd)
        else:
            out = self.fs.cat_ranges(
                paths, [p[1] for p in pieces], [p[2] for p in pieces], on_error="return"
            )
        for i, (p, (_, first, last)) in enumerate(zip(paths, pieces, strict=True)):
            got = out[i]
            if got is None or isinstance(got, FileNotFoundError):
                # zarr does not write a chunk that is all fill value
                out[i] = self.fill * ((last - first) // len(self.fill))
                continue
            if isinstance(got, BaseException):
                raise got
            self.bytes_read += len(got)
            if len(got) != last - first:
                raise ConfigError(
                    f"{p}: chunk file ends at byte {first + len(got)}, before {last} (truncated?)"
                )
        return out


def _open_array(arr: Any, fs: Any, path: str) -> _Array:
    raw = _raw_layout(arr)
    return _ZarrArray(arr) if raw is None else _RawArray(fs, path, arr, *raw)


class _Docs:
    """The document starts inside given rows: by range through `row_docs`, or searched in memory."""

    def __init__(self, doc_starts: _Array, row_docs: _Array | None, row: int, n_docs: int) -> None:
        self.doc_starts, self.row_docs = doc_starts, row_docs
        self.row, self.n_docs = row, n_docs

    def starts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index in `rows`, offset in that row) of each document starting in one of `rows`."""
        first = rows.astype(np.int64) * self.row
        if self.row_docs is None:
            assert isinstance(self.doc_starts, _MemArray)
            lo = np.searchsorted(self.doc_starts.data, first, side="left")
            hi = np.searchsorted(self.doc_starts.data, first + self.row, side="left")
        else:
            bounds = self.row_docs.spans(rows, rows + 2).reshape(len(rows), 2).astype(np.int64)
            lo, hi = bounds[:, 0], bounds[:, 1]
            if len(rows) and ((hi < lo).any() or lo.min() < 0 or hi.max() > self.n_docs):
                raise ConfigError(
                    "row_docs disagrees with doc_starts (a damaged dataset); re-prepare it"
                )
        which = np.repeat(np.arange(len(rows)), hi - lo)
        return which, self.doc_starts.spans(lo, hi).astype(np.int64) - first[which]


class _Reader:
    """Pure batch production from (epoch, position): no thread, no consumed state.

    The prefetch thread holds only this object, never the PackedDataset, so dropping the
    dataset collects it and stops the thread.
    """

    def __init__(
        self,
        tokens: _Array,
        docs: _Docs | None,
        n: int,
        seq_len: int,
        options: PackedOptions,
        rank: int,
        world_size: int,
    ) -> None:
        self.tokens = tokens
        self.docs = docs
        self.seq_len = seq_len
        self.n = n
        self.opt = options
        self.seed = options.seed
        self.rank = rank
        self.world_size = world_size
        # this rank's rows of the next few global batches: one permutation call for _AHEAD
        # batches, because numpy's per-call cost dominates a batch of a few rows
        self._ahead: dict[tuple[int, int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    _AHEAD = 64

    @property
    def global_batch(self) -> int:
        return self.world_size * self.opt.batch_size

    def order(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The sequences at `positions` of `epoch`'s visiting order."""
        if not self.opt.shuffle:
            return positions
        return KeyedPermutation(self.n, self.seed, epoch)(positions)

    def normalise(self, epoch: int, pos: int) -> tuple[int, int]:
        """Roll over to the next epoch when no (full, with drop_last) global batch is left."""
        left = self.n - pos
        if left <= 0 or (self.opt.drop_last and left < self.global_batch):
            return epoch + 1, 0
        return epoch, pos

    def rows_at(self, epoch: int, pos: int) -> tuple[np.ndarray, int, int]:
        """This rank's rows of the global batch at (epoch, pos), and the state after it."""
        epoch, pos = self.normalise(epoch, pos)
        gb, b = self.global_batch, self.opt.batch_size
        end = min(pos + gb, self.n)
        m, ws, r = end - pos, self.world_size, self.rank
        if (
            m < gb
        ):  # the short final batch of an epoch (drop_last=False): split as evenly as possible
            start, size = r * (m // ws) + min(r, m % ws), m // ws + (1 if r < m % ws else 0)
            return self.order(epoch, np.arange(pos + start, pos + start + size)), epoch, end
        with self._lock:
            rows = self._ahead.get((self.seed, epoch, pos))
            if rows is None:
                k = min(self._AHEAD, (self.n - pos) // gb)  # full global batches left in the epoch
                firsts = pos + np.arange(k, dtype=np.int64) * gb
                positions = (firsts[:, None] + r * b + np.arange(b)).reshape(-1)
                order = self.order(epoch, positions).reshape(k, b)
                self._ahead = {(self.seed, epoch, int(f)): order[i] for i, f in enumerate(firsts)}
                rows = self._ahead[(self.seed, epoch, pos)]
        return rows, epoch, end

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        toks = self.tokens.rows(rows).astype(np.int64)
        L = self.seq_len
        out = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(toks[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(toks[:, 1:])),
        }
        if self.docs is not None:
            which, rel = self.docs.starts(rows)
            keep = (
                rel < L
            )  # a document starting at a row's last token (a label only) is not an input
            which, rel = which[keep], rel[keep]
            bump = np.zeros((len(rows), L), dtype=np.int64)
            inner = rel > 0  # a document starting at offset 0 is segment 0
            bump[which[inner], rel[inner]] = 1
            out["segment_ids"] = torch.from_numpy(np.cumsum(bump, axis=1))
            if self.opt.position_ids:
                # positions count from the last document start at or before each token (a
                # document continued from the previous row restarts at 0 with the row)
                last = np.zeros((len(rows), L), dtype=np.int64)
                last[which, rel] = rel
                pos = np.arange(L, dtype=np.int64)[None, :] - np.maximum.accumulate(last, axis=1)
                out["position_ids"] = torch.from_numpy(pos)
        return out

    def produce(self, epoch: int, pos: int) -> tuple[dict[str, torch.Tensor], int, int]:
        rows, epoch, end = self.rows_at(epoch, pos)
        return self.batch(rows), epoch, end


class _Prefetcher:
    """A daemon thread that keeps up to `depth` batches ready, starting from a given state."""

    def __init__(self, reader: _Reader, epoch: int, pos: int, depth: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run,
            args=(reader, epoch, pos, self._q, self._stop),
            name="k2-packed-prefetch",
            daemon=True,
        )
        self.thread.start()

    @staticmethod
    def _run(reader: _Reader, epoch: int, pos: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = reader.produce(epoch, pos)
                _, epoch, pos = item
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, raised there
            while not stop.is_set():
                try:
                    q.put(exc, timeout=0.05)
                    break
                except queue.Full:
                    continue

    def get(self) -> tuple[dict[str, torch.Tensor], int, int]:
        while True:
            try:
                item = self._q.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("packed dataset prefetch thread died") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class PackedDataset:
    """An endless, seeded, per-rank sharded, resumable iterator of batches over a packed dataset."""

    def __init__(
        self, options: PackedOptions | None = None, *, rank: int = 0, world_size: int = 1
    ) -> None:
        options = options or PackedOptions()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be in [0, world_size) (got rank {rank}, world size {world_size})"
            )
        import fsspec
        import zarr

        self.options = options
        self.uri = options.uri or _default_uri()
        self.manifest = read_manifest(self.uri)
        self.seq_len = int(self.manifest["seq_len"])
        self.eos_id = int(self.manifest["eos_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.format_version = format_version(self.manifest)
        try:
            root = zarr.open_group(self.uri, mode="r")
        except Exception as exc:  # noqa: BLE001 - any storage failure becomes one line
            raise ConfigError(f"{self.uri}: cannot open packed dataset ({exc})") from None
        try:
            group = root[options.split]
        except KeyError:
            with warnings.catch_warnings():  # manifest.json is not a zarr node
                warnings.simplefilter("ignore")
                splits = sorted(k for k, _ in root.groups())
            raise ConfigError(
                f"{self.uri}: no split {options.split!r} (splits: {', '.join(splits) or 'none'})"
            ) from None
        names = (
            ("tokens", "doc_starts", "row_docs")
            if self.format_version >= 2
            else ("tokens", "doc_starts")
        )
        try:
            arrays = {name: group[name] for name in names}
        except KeyError as exc:
            raise ConfigError(
                f"{self.uri}/{options.split}: missing array {exc}; re-run "
                f"{reprepare_hint(self.uri)}"
            ) from None
        tokens = arrays["tokens"]
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len + 1:
            raise ConfigError(
                f"{self.uri}/{options.split}: tokens has shape {tuple(tokens.shape)}, "
                f"expected [n_seq, {self.seq_len + 1}] for seq_len {self.seq_len}"
            )
        n = int(tokens.shape[0])
        if "row_docs" in arrays and arrays["row_docs"].shape != (n + 1,):
            raise ConfigError(
                f"{self.uri}/{options.split}: row_docs has shape "
                f"{tuple(arrays['row_docs'].shape)}, expected [{n + 1}]"
            )
        nbytes = tokens.shape[0] * tokens.shape[1] * np.dtype(tokens.dtype).itemsize
        in_memory = nbytes <= options.in_memory_max_mb * 2**20
        fs, root_path = fsspec.core.url_to_fs(self.uri)
        base = f"{root_path.rstrip('/')}/{options.split}"
        rows = (
            _MemArray(np.asarray(tokens[...]))
            if in_memory
            else _open_array(tokens, fs, f"{base}/tokens")
        )
        docs = None
        if options.doc_mask:
            starts = arrays["doc_starts"]
            if in_memory or "row_docs" not in arrays:
                if not in_memory:
                    warnings.warn(
                        f"{self.uri}: {FORMAT} version {self.format_version} has no per-row "
                        f"document index, so its {starts.shape[0]:,} document starts are read "
                        f"into memory; re-run {reprepare_hint(self.uri)} to read them by range",
                        stacklevel=2,
                    )
                docs = _Docs(
                    _MemArray(np.asarray(starts[...], dtype=np.int64)),
                    None,
                    self.seq_len + 1,
                    int(starts.shape[0]),
                )
            else:
                docs = _Docs(
                    _open_array(starts, fs, f"{base}/doc_starts"),
                    _open_array(arrays["row_docs"], fs, f"{base}/row_docs"),
                    self.seq_len + 1,
                    int(starts.shape[0]),
                )
        self._arrays = [a for a in (rows, docs and docs.doc_starts, docs and docs.row_docs) if a]
        self._reader = _Reader(rows, docs, n, self.seq_len, options, rank, world_size)
        self.rank, self.world_size = rank, world_size
        if n == 0 or (options.drop_last and n < self._reader.global_batch):
            raise ConfigError(
                f"{self.uri}/{options.split}: {n} sequences, fewer than one global batch "
                f"({world_size} ranks x batch {options.batch_size})"
            )
        self._epoch, self._pos = 0, 0  # consumed
        self._prefetcher: _Prefetcher | None = None

    # --- facts ----------------------------------------------------------------------------------
    @property
    def n_sequences(self) -> int:
        """Sequences (rows) in the split."""
        return self._reader.n

    @property
    def global_batch_size(self) -> int:
        """Sequences per step over all ranks."""
        return self._reader.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank."""
        n, gb = self._reader.n, self._reader.global_batch
        return n // gb if self.options.drop_last else -(-n // gb)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._reader.normalise(self._epoch, self._pos)[0]

    @property
    def in_memory(self) -> bool:
        """Whether the split's tokens were read into memory at start."""
        return isinstance(self._reader.tokens, _MemArray)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the store as byte ranges since opening (zarr-decoded reads: not
        counted)."""
        return sum(a.bytes_read for a in self._arrays)

    # --- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> PackedDataset:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.options.prefetch == 0:
            batch, epoch, pos = self._reader.produce(self._epoch, self._pos)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(
                    self._reader, self._epoch, self._pos, self.options.prefetch
                )
            batch, epoch, pos = self._prefetcher.get()
        self._epoch, self._pos = epoch, pos
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (idempotent; iteration restarts it)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> PackedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the batches consumed so far."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._pos,
            "seed": self._reader.seed,
            "world_size": self.world_size,
            "batch_size": self.options.batch_size,
            "n_sequences": self._reader.n,
            "shuffle": self.options.shuffle,
            "split": self.options.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; re-shards onto this world size when the position allows it."""
        try:
            epoch, pos, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
            old_ws, old_b = (
                int(state["world_size"]),
                int(state.get("batch_size", self.options.batch_size)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"packed dataset state is malformed ({exc!r})") from None
        version = state.get("version", 1)
        # version 1 drew another shuffle order: only its unshuffled positions mean the same now
        if version != STATE_VERSION and not (version == 1 and state.get("shuffle") is False):
            raise ConfigError(
                f"packed dataset state version {version} is from an older k2-data whose shuffle "
                f"order differs (this one reads version {STATE_VERSION}), so it cannot resume "
                "exactly; resume with the k2-data that saved it, or start the run afresh"
            )
        n = state.get("n_sequences", self._reader.n)
        if n != self._reader.n:
            raise ConfigError(
                f"packed dataset state is for {n} sequences, but {self.uri}/{self.options.split} "
                f"has {self._reader.n}: the dataset changed"
            )
        if state.get("shuffle", self.options.shuffle) != self.options.shuffle:
            raise ConfigError(
                f"packed dataset state has shuffle={state['shuffle']}, options have "
                f"shuffle={self.options.shuffle}"
            )
        if epoch < 0 or not 0 <= pos <= self._reader.n:
            raise ConfigError(f"packed dataset state out of range (epoch {epoch}, position {pos})")
        gb = self._reader.global_batch
        if pos % gb and self.options.drop_last and self._reader.n - pos < old_ws * old_b:
            epoch, pos = epoch + 1, 0  # saved at the end of an epoch: its tail was dropped
        if pos % gb and pos != self._reader.n:
            raise ConfigError(
                f"cannot resume the packed dataset at sequence {pos} of epoch {epoch} with "
                f"world size {self.world_size} x batch {self.options.batch_size} (global batch "
                f"{gb}): it was saved with world size {old_ws} x batch {old_b} (global batch "
                f"{old_ws * old_b}), and the position must be a multiple of the new global batch"
            )
        self.close()
        self._reader.seed = seed
        self._epoch, self._pos = epoch, pos


def make_loader(options: PackedOptions, rank: int = 0, world_size: int = 1) -> PackedDataset:
    """A PackedDataset for `rank` of `world_size`."""
    return PackedDataset(options, rank=rank, world_size=world_size)


def build_packed(
    *,
    options: PackedOptions,
    rank: int = 0,
    world_size: int = 1,
    split: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
) -> PackedDataset:
    """Packed token sequences from a zarr store (`k2 data prepare`), shuffled, sharded, resumable.

    The run passes its own `split` (train/val: it wins), `batch_size` (train.micro_batch_size) and
    `seed` (train.seed: used unless the options set one), and `seq_len` (data.seq_len: must match
    the store's).
    """
    update: dict[str, Any] = {}
    if split is not None:
        update["split"] = split
        if split != "train" and "drop_last" not in options.model_fields_set:
            update["drop_last"] = False  # evaluation reads every row, even a short val split
    if batch_size is not None:
        if "batch_size" in options.model_fields_set and options.batch_size != batch_size:
            raise ConfigError(
                f"data.options.batch_size is {options.batch_size} but the run's micro batch size "
                f"is {batch_size}; set only train.micro_batch_size"
            )
        update["batch_size"] = batch_size
    if seed is not None and "seed" not in options.model_fields_set:
        update["seed"] = seed
    if update:
        options = PackedOptions.model_validate({**options.model_dump(exclude_unset=True), **update})
    ds = make_loader(options, rank=rank, world_size=world_size)
    if seq_len is not None and seq_len != ds.seq_len:
        ds.close()
        raise ConfigError(
            f"{ds.uri}: packed with seq_len {ds.seq_len}, but data.seq_len is {seq_len}; "
            "re-run `k2 data prepare` or set data.seq_len"
        )
    return ds
