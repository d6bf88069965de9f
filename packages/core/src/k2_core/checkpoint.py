"""Checkpoints as zarr v3 stores over fsspec, written rank-parallel, read row by row.

Layout of a checkpoint at URI (format version 2):
    zarr.json                 group; attrs hold the format tag, its version and caller metadata
    <group>/zarr.json         one zarr group per tensor group (`model`, `optim`, `rng`, ...)
    <group>/<name>/zarr.json  one uncompressed array per tensor (weights barely compress)
    <group>/<name>/c/<i>/0..  chunk i along dim 0: the rows' little-endian bytes, the edge chunk
                              zero-padded to the full chunk shape (what zarr's `bytes` codec
                              stores), so plain `zarr.open_group(uri)` reads every tensor
    k2_commit.json            written last: each tensor's shape, dtype, chunk rows and the crc32
                              of every chunk, the bytes each rank wrote

A reader refuses a store without the marker, so a killed writer never leaves a checkpoint
that looks complete. No pickle: tensors are raw arrays, metadata is JSON.

The chunk grid is a pure function of a tensor's global shape (`chunk_rows`), never of the
parallel layout or the dtype: an expert stack [E, a, b] has one expert per chunk, any other
tensor a block of about 2**20 elements of rows. A weight and its fp32 optimizer moments share a
grid, and a layout whose row splits fall on chunk boundaries (`split_rows`) writes and reads
whole chunks only.

Saving, rank-parallel (every rank, then one rank after a barrier):

    w = ShardWriter(tmp_uri, rank)                  # removes this rank's stale manifest
    w.write("model", name, global_shape, dtype, row_start, local_rows)   # per owned shard
    w.close()                                       # -> _k2_ranks/rank_<r>.json (chunk crcs)
    barrier()
    if rank == 0: commit_sharded(tmp_uri, final_uri, world_size, meta)
    barrier()

`write` takes the rows [row_start, row_start + len(local_rows)) of the global tensor; they must
start on a chunk boundary and end on one or at the tensor's end. It streams: one chunk (at most
1 MiB at a time when the rows need a copy, a dtype change or come from a GPU) is copied to host
memory, checksummed and written, so saving adds little to the resident set. Tensors must not
change until `close()` returns. `commit_sharded` checks that every chunk of every tensor was
written by exactly one rank (a missing rank manifest, a missing or a twice-written chunk is a
`CheckpointError` naming them and nothing is committed), writes the zarr metadata, then the
marker, then renames the store to its final URI. `CountingWriter` has the same interface,
writes nothing and touches no tensor data (meta tensors work): it adds up the bytes a rank
would write. `split_rows` and `spread_rows` cut tensors into chunk-aligned shares.

Loading: `CheckpointReader(uri)` lists the tensors (`.tensors`: shape, dtype, chunk rows) and
the attrs, and `read_rows(group, name, start, stop)` reads only the chunks that overlap the
rows, verifying each chunk's crc32; `.bytes_read` counts what was read. `load_tensors` reads
whole groups. Stores of format version 1 (one crc32 per tensor, chunks of up to 64 MiB, written
by one process) still load; their rows are read by reading the whole tensor.

On a local filesystem chunk files are written and read with plain file I/O straight from and
into the tensors' memory; other filesystems (`memory://`, `s3://`) get the same keys through
fsspec. `check_checkpoint_dir` says, before anything is built, whether a URI can hold
checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "k2-checkpoint"
FORMAT_VERSION = 2
COMMIT = "k2_commit.json"
RANKS_DIR = "_k2_ranks"
CHUNK_ELEMENTS = 1 << 20  # a row block holds about this many elements (4 MiB of fp32)
_CHUNK_BYTES = 64 << 20  # version 1 only: its chunks were cut by bytes
_IO_THREADS = 8
_BLOCK = 1 << 20  # copy, write, read and checksum in 1 MiB blocks, while the block is in cache

# dtypes numpy has no name for travel as same-width integers, tagged in the marker.
_VIEW_AS = {
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}
_BY_NAME = {str(t).removeprefix("torch."): t for t in _VIEW_AS}


# -- the chunk grid ---------------------------------------------------------------------------


def chunk_rows(shape: Sequence[int]) -> int:
    """Rows of dim 0 per chunk: a pure function of the global shape (not layout, not dtype)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1
    if len(shape) == 3:  # an expert stack [E, a, b]: one expert per chunk
        return 1
    rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    if shape[0] <= rows:
        return max(1, shape[0])  # one chunk, never padded past the tensor
    # as many chunks as the element budget asks for, their rows evened out so that the
    # zero padding zarr puts on the edge chunk stays under one row per chunk
    return -(-shape[0] // -(-shape[0] // rows))


def num_chunks(shape: Sequence[int], rows: int | None = None) -> int:
    """How many chunks a tensor of `shape` has (0 when any dimension is 0; 0-d tensors: 1)."""
    if len(shape) == 0:
        return 1
    if any(int(d) == 0 for d in shape):
        return 0
    return -(-int(shape[0]) // (rows or chunk_rows(shape)))


def chunk_key(ndim: int, index: int) -> str:
    """zarr v3 key of chunk `index` along dim 0 (default encoding, '/' separator)."""
    return "c" if ndim == 0 else f"c/{index}" + "/0" * (ndim - 1)


def split_rows(shape: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """`parts` chunk-aligned (start, stop) row ranges of near-equal chunk counts, in order."""
    n = num_chunks(shape)
    rows = chunk_rows(shape)
    total = int(shape[0]) if len(shape) else 1
    out = []
    for p in range(parts):
        a, b = n * p // parts, n * (p + 1) // parts
        out.append((min(a * rows, total), min(b * rows, total)))
    return out


def _storage_dtype(dtype: torch.dtype) -> np.dtype:
    t = _VIEW_AS.get(dtype, dtype)
    return np.dtype(torch.empty((), dtype=t).numpy().dtype)


def _row_bytes(shape: Sequence[int], itemsize: int) -> int:
    return math.prod(int(d) for d in shape[1:]) * itemsize


def _chunk_bytes(shape: Sequence[int], itemsize: int, rows: int) -> int:
    """Bytes of one (padded) chunk file."""
    return itemsize if len(shape) == 0 else rows * _row_bytes(shape, itemsize)


def spread_rows(
    arrays: Mapping[str, tuple[Sequence[int], torch.dtype]],
    world_size: int,
    load: Sequence[int] | None = None,
) -> dict[str, list[tuple[int, int, int]]]:
    """Who writes which rows of replicated tensors: {key: [(rank, start, stop), ...]}.

    The chunks of all `arrays` (key -> (global shape, dtype)), in key order, are cut into
    contiguous runs so that each rank's bytes plus its `load` (bytes it already writes, e.g.
    experts or optimizer shards) come out as even as whole chunks allow. Every rank computes
    the same answer from the same arguments. A tensor without chunks goes to rank 0.
    """
    load = list(load) if load is not None else [0] * world_size
    stream: list[tuple[str, int, int, int, int]] = []  # key, chunk, first row, last row, bytes
    out: dict[str, list[tuple[int, int, int]]] = {}
    for key in sorted(arrays):
        shape, dtype = arrays[key]
        rows, n = chunk_rows(shape), num_chunks(shape)
        if n == 0:
            out[key] = [(0, 0, int(shape[0]) if len(shape) else 0)]
        size = _chunk_bytes(shape, torch.empty((), dtype=dtype).element_size(), rows)
        total = int(shape[0]) if len(shape) else 1
        stream += [(key, i, i * rows, min((i + 1) * rows, total), size) for i in range(n)]
    # water-filling: the level every rank's total rises to, given what each already holds
    need = sum(s[4] for s in stream)
    level, held = 0.0, sorted(load)
    for k in range(world_size, 0, -1):
        level = (need + sum(held[:k])) / k
        if level >= held[k - 1]:
            break
    bounds = list(np.cumsum([max(0.0, level - x) for x in load]))
    pos, rank = 0, 0
    for key, _, r0, r1, size in stream:
        mid = pos + size / 2
        while rank < world_size - 1 and mid >= bounds[rank]:
            rank += 1
        pos += size
        runs = out.setdefault(key, [])
        if runs and runs[-1][0] == rank and runs[-1][2] == r0:
            runs[-1] = (rank, runs[-1][1], r1)
        else:
            runs.append((rank, r0, r1))
    return out


# -- small helpers ----------------------------------------------------------------------------


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: str, shape: list[int]) -> torch.Tensor:
    # ascontiguousarray would turn a 0-d array into shape (1,): restore the recorded shape.
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(shape)
    return t.view(_BY_NAME[dtype]) if dtype in _BY_NAME else t


def _crc32(arr: np.ndarray) -> int:
    """crc32 of the array's bytes, read in place (zlib drops the GIL: threads overlap it)."""
    if arr.size == 0:  # memoryview cannot cast a view with a zero in its shape
        return zlib.crc32(b"")
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: Any) -> torch.dtype | None:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def _array_json(shape: Sequence[int], storage: str, rows: int) -> dict[str, Any]:
    """zarr v3 metadata of an uncompressed array chunked along dim 0 (what zarr writes)."""
    chunks = [rows, *(max(1, int(d)) for d in shape[1:])] if len(shape) else []
    return {
        "shape": [int(d) for d in shape],
        "data_type": storage,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _group_json(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": attrs, "zarr_format": 3, "node_type": "group"}


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> Any:
    """Parse one JSON file; anything wrong with it is a one-line CheckpointError naming it."""
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{what}: cannot be read ({_first_line(e)})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = (
            f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        )
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CheckpointError(f"{what}: not valid JSON ({reason}{where})") from None


def _write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any, local: bool) -> None:
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") if local else fs.open(path, "w") as f:
        json.dump(obj, f)


# -- writing ----------------------------------------------------------------------------------


class _Writer:
    """The bookkeeping both writers share: alignment checks, the chunks and bytes per array."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.bytes_written = 0
        self._arrays: dict[str, dict[str, Any]] = {}
        self._closed = False

    def _plan(
        self,
        group: str,
        name: str,
        global_shape: Sequence[int],
        dtype: torch.dtype,
        row_start: int,
        tensor: torch.Tensor,
    ) -> tuple[str, dict[str, Any], list[int]]:
        """Check a write and register its array; returns (key, entry, chunk indices)."""
        if self._closed:
            raise ValueError("checkpoint writer is closed")
        if not group or "/" in group or not name or name.startswith("/") or name.endswith("/"):
            raise ValueError(f"bad checkpoint tensor name {group!r}/{name!r}")
        key, shape = f"{group}/{name}", tuple(int(d) for d in global_shape)
        rows = chunk_rows(shape)
        n_rows = int(tensor.shape[0]) if tensor.dim() else 1
        total = shape[0] if shape else 1
        if tuple(tensor.shape[1:]) != shape[1:] or (tensor.dim() == 0) != (len(shape) == 0):
            raise ValueError(
                f"{key}: local shape {tuple(tensor.shape)} does not fit global shape {shape}"
            )
        stop = row_start + n_rows
        if not 0 <= row_start <= stop <= total:
            raise ValueError(f"{key}: rows [{row_start}, {stop}) outside [0, {total})")
        if row_start % rows or (stop % rows and stop != total):
            raise ValueError(
                f"{key}: rows [{row_start}, {stop}) are not chunk-aligned (chunks "
                f"of {rows} rows; start on a multiple of it, end on one or at {total})"
            )
        entry = self._arrays.get(key)
        meta = {
            "shape": list(shape),
            "dtype": _dtype_name(dtype),
            "storage_dtype": _storage_dtype(dtype).name,
            "chunk_rows": rows,
        }
        if entry is None:
            entry = self._arrays[key] = {**meta, "chunks": {}}
        elif any(entry[k] != v for k, v in meta.items()):
            raise ValueError(
                f"{key}: written before as {entry['shape']} {entry['dtype']}, now "
                f"as {list(shape)} {meta['dtype']}"
            )
        first = row_start // rows
        idx = list(range(first, first + num_chunks((stop - row_start, *shape[1:]), rows)))
        if not shape:
            idx = [0]
        if any(str(i) in entry["chunks"] for i in idx):
            raise ValueError(f"{key}: rows [{row_start}, {stop}) were already written by this rank")
        return key, entry, idx

    def summary(self) -> dict[str, Any]:
        """This rank's manifest: every array it touched, its chunks (crc32, bytes) and total."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "bytes": self.bytes_written,
            "arrays": self._arrays,
        }


class CountingWriter(_Writer):
    """A dry-run writer: the interface of `ShardWriter`, nothing written, only bytes added up.

    It reads tensors' shapes and dtypes only, so meta tensors (no storage) are fine.
    """

    def write(
        self,
        group: str,
        name: str,
        global_shape: Sequence[int],
        dtype: torch.dtype,
        row_start: int,
        tensor: torch.Tensor,
    ) -> None:
        """Count the chunks covering rows [row_start, row_start + len(tensor)) of group/name."""
        key, entry, idx = self._plan(group, name, global_shape, dtype, row_start, tensor)
        size = _chunk_bytes(entry["shape"], _storage_dtype(dtype).itemsize, entry["chunk_rows"])
        for i in idx:
            entry["chunks"][str(i)] = [None, size]
            self.bytes_written += size

    def close(self) -> dict[str, Any]:
        """Return the manifest this rank would write (crc32s are None)."""
        self._closed = True
        return self.summary()


class ShardWriter(_Writer):
    """Writes one rank's chunks of a checkpoint under `uri` (usually `step_N.tmp`).

    Chunk files are written on a pool of I/O threads; `write` returns once the chunks are
    queued (a bounded queue, so memory stays bounded) and `close` waits for them, then writes
    the rank's manifest `_k2_ranks/rank_<rank>.json`. Errors surface at `close`.
    """

    def __init__(self, uri: str, rank: int, threads: int = _IO_THREADS) -> None:
        super().__init__(rank)
        self.uri = uri
        self.fs, self.path = _fs(uri)
        self.local = _is_local(self.fs)
        self.manifest = f"{self.path}/{RANKS_DIR}/rank_{rank:05d}.json"
        # a manifest left by an earlier, killed attempt at this step must not vouch for chunks
        # this attempt may never write
        if self.fs.exists(self.manifest):
            self.fs.rm(self.manifest)
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._jobs: list[Future[None]] = []
        self._lock = threading.Lock()

    def write(
        self,
        group: str,
        name: str,
        global_shape: Sequence[int],
        dtype: torch.dtype,
        row_start: int,
        tensor: torch.Tensor,
    ) -> None:
        """Queue the chunks covering rows [row_start, row_start + len(tensor)) of group/name.

        `tensor` holds those rows of the global tensor (any device; converted to `dtype` one
        block at a time); the rows must start and end on chunk boundaries (or the array end).
        """
        key, entry, idx = self._plan(group, name, global_shape, dtype, row_start, tensor)
        rows, shape = entry["chunk_rows"], entry["shape"]
        full = _chunk_bytes(shape, _storage_dtype(dtype).itemsize, rows)
        for i in idx:
            with self._lock:  # the I/O threads fill in other chunks of this entry meanwhile
                entry["chunks"][str(i)] = None  # claimed now, filled in by the job
            src = tensor if not shape else tensor[i * rows - row_start : (i + 1) * rows - row_start]
            self._slots.acquire()
            try:
                fut = self._pool.submit(self._write_chunk, key, entry, i, src, dtype, full)
            except BaseException:
                self._slots.release()
                raise
            fut.add_done_callback(lambda _f: self._slots.release())
            self._jobs.append(fut)

    def _write_chunk(
        self,
        key: str,
        entry: dict[str, Any],
        i: int,
        src: torch.Tensor,
        dtype: torch.dtype,
        full: int,
    ) -> None:
        """Stream one chunk to its file in 1 MiB blocks, checksumming each block on the way."""
        path = f"{self.path}/{key}/{chunk_key(len(entry['shape']), i)}"
        crc = n = 0
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "wb", buffering=0)
        else:
            f = self.fs.open(path, "wb")
        with f:
            for block in _blocks(src, dtype):
                crc = zlib.crc32(block, crc)
                _write_all(f, block)
                n += len(block)
            zeros = bytes(min(_BLOCK, full - n)) if full > n else b""
            while n < full:  # zarr's edge chunks are full-size: pad with zeros
                z = memoryview(zeros)[: full - n]
                crc = zlib.crc32(z, crc)
                _write_all(f, z)
                n += len(z)
        with self._lock:
            entry["chunks"][str(i)] = [crc, n]
            self.bytes_written += n

    def close(self) -> dict[str, Any]:
        """Wait for every chunk, then write this rank's manifest; returns it."""
        if self._closed:
            return self.summary()
        self._closed = True
        try:
            for fut in self._jobs:
                fut.result()
        finally:
            self._pool.shutdown(wait=True)
        manifest = self.summary()
        _write_json(self.fs, self.manifest, manifest, self.local)
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # no manifest: the rank counts as not finished
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)


def _write_all(f: Any, block: memoryview) -> None:
    """Write all of `block`: an unbuffered file may take less than asked in one call."""
    while block:
        k = f.write(block)
        block = block[k:] if k is not None else block[:0]  # fsspec files take it all, say None


def _blocks(src: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
    """The chunk's storage bytes in blocks of about 1 MiB, copying at most a block at a time."""
    src = src.detach()
    if src.device.type == "cpu" and src.dtype == dtype and src.is_contiguous():
        t = src.reshape(-1)
        t = t.view(_VIEW_AS[dtype]) if dtype in _VIEW_AS else t
        if t.numel() == 0:
            return
        flat = memoryview(t.numpy()).cast("B")  # straight from the tensor's memory
        for b in range(0, len(flat), _BLOCK):
            yield flat[b : b + _BLOCK]
        return
    flat_t = src.reshape(-1)  # a view when contiguous; else one chunk's copy on its device
    per = max(1, _BLOCK // torch.empty((), dtype=dtype).element_size())
    for e in range(0, flat_t.numel(), per):
        block = flat_t[e : e + per].to(device="cpu", dtype=dtype)
        block = block.view(_VIEW_AS[dtype]) if dtype in _VIEW_AS else block
        yield memoryview(block.numpy()).cast("B")


def _rank_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str, rank: int) -> dict[str, Any]:
    name = f"{RANKS_DIR}/rank_{rank:05d}.json"
    try:
        m = _read_json(fs, f"{path}/{name}", f"{uri}/{name}")
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri}: rank {rank} did not finish its part of the save (no {name}); not committed"
        ) from None
    if not isinstance(m, dict) or not isinstance(m.get("arrays"), dict):
        raise CheckpointError(f"{uri}/{name}: not a k2 rank manifest (no 'arrays' object)")
    return m


def commit_sharded(
    uri_tmp: str, uri_final: str | None, world_size: int, meta: dict[str, Any] | None = None
) -> str:
    """Check the ranks' manifests, write the zarr metadata and the marker, rename; -> URI.

    Run by one rank after every rank's `ShardWriter.close()` (the caller's barrier). Every chunk
    of every array must have been written by exactly one of ranks 0..world_size-1, else
    CheckpointError and nothing is committed. `uri_final` None commits in place.
    """
    fs, path = _fs(uri_tmp)
    local = _is_local(fs)
    tensors: dict[str, dict[str, Any]] = {}
    owner: dict[str, dict[int, int]] = {}
    ranks: dict[str, int] = {}
    for r in range(world_size):
        m = _rank_manifest(fs, path, uri_tmp, r)
        ranks[str(r)] = int(m.get("bytes", 0))
        try:
            for key, a in m["arrays"].items():
                head = {k: a.get(k) for k in ("shape", "dtype", "storage_dtype", "chunk_rows")}
                if key not in tensors:
                    tensors[key], owner[key] = dict(head), {}
                elif any(tensors[key][k] != v for k, v in head.items()):
                    raise CheckpointError(
                        f"{uri_tmp}: tensor {key} written as {tensors[key]['shape']} "
                        f"{tensors[key]['dtype']} by one rank and {a.get('shape')} "
                        f"{a.get('dtype')} by rank {r}; not committed"
                    )
                for i, (crc, _size) in a.get("chunks", {}).items():
                    first = owner[key].setdefault(int(i), r)
                    if first != r:
                        raise CheckpointError(
                            f"{uri_tmp}: tensor {key} chunk {i} written by ranks "
                            f"{first} and {r}; not committed"
                        )
                    tensors[key].setdefault("crc", {})[int(i)] = crc
        except (TypeError, ValueError, AttributeError) as e:  # a hand-edited or torn manifest
            raise CheckpointError(
                f"{uri_tmp}/{RANKS_DIR}/rank_{r:05d}.json: malformed "
                f"({_first_line(e)}); not committed"
            ) from None
    for key, t in tensors.items():
        n = num_chunks(t["shape"], t["chunk_rows"])
        have = t.pop("crc", {})
        missing = [i for i in range(n) if i not in have]
        if missing:
            raise CheckpointError(
                f"{uri_tmp}: tensor {key} chunk {missing[0]} was written by no "
                f"rank ({len(missing)} of {n} missing); not committed"
            )
        t["crc32"] = [have[i] for i in range(n)]
    # the zarr metadata, so that plain zarr opens the store: every group on the way, then arrays
    groups = {k.rsplit("/", 1)[0] for k in tensors}
    groups |= {g.rsplit("/", i)[0] for g in list(groups) for i in range(1, g.count("/") + 1)}
    attrs = {**(meta or {}), "format": FORMAT, "format_version": FORMAT_VERSION}
    jobs = [(f"{path}/zarr.json", _group_json(attrs))]
    jobs += [(f"{path}/{g}/zarr.json", _group_json({})) for g in sorted(groups)]
    jobs += [
        (f"{path}/{k}/zarr.json", _array_json(t["shape"], t["storage_dtype"], t["chunk_rows"]))
        for k, t in tensors.items()
    ]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        list(pool.map(lambda j: _write_json(fs, j[0], j[1], local), jobs))
    if fs.exists(f"{path}/{RANKS_DIR}"):  # merged into the marker: the store stays plain zarr
        fs.rm(f"{path}/{RANKS_DIR}", recursive=True)
    _write_json(
        fs,
        f"{path}/{COMMIT}",
        {"format": FORMAT, "format_version": FORMAT_VERSION, "tensors": tensors, "ranks": ranks},
        local,
    )
    if uri_final is None or uri_final.rstrip("/") == uri_tmp.rstrip("/"):
        return uri_tmp
    final = _fs(uri_final)[1]
    if fs.exists(final):
        fs.rm(final, recursive=True)
    fs.mv(path, final, recursive=True)
    return uri_final


def save_tensors(
    uri: str, groups: dict[str, dict[str, torch.Tensor]], attrs: dict[str, Any] | None = None
) -> None:
    """Write named groups of tensors and JSON `attrs` to `uri` from one process, then the marker."""
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    with ShardWriter(uri, 0) as w:
        for group, ts in groups.items():
            for name, t in ts.items():
                w.write(group, name, t.shape, t.dtype, 0, t)
    commit_sharded(uri, None, 1, attrs)


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """What the marker records about one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunk_rows: int
    storage_dtype: str
    crc32: tuple[int, ...] | int  # one per chunk (version 2), one per tensor (version 1)


def is_committed(uri: str) -> bool:
    """Whether a complete checkpoint exists at `uri`."""
    fs, path = _fs(uri)
    return fs.exists(f"{path}/{COMMIT}")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(what: str, key: str, e: Any, version: int) -> TensorInfo:
    """Validate one tensor's record in the marker; a bad one is a CheckpointError naming it."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{what}: tensor {key}: {why}")

    if not isinstance(e, dict):
        raise bad("record is not an object")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise bad(f"'shape' must be a list of sizes (got {shape!r})")
    dtype = _torch_dtype(e.get("dtype"))
    if dtype is None:
        raise bad(f"'dtype' is not a torch dtype (got {e.get('dtype')!r})")
    storage = e.get("storage_dtype", _storage_dtype(dtype).name)
    try:
        np.dtype(storage)
    except TypeError:
        raise bad(f"'storage_dtype' is not a dtype (got {storage!r})") from None
    rows = e.get("chunk_rows", 0)
    crc = e.get("crc32")
    if version >= 2:
        if not _is_uint(rows) or rows < 1:
            raise bad(f"'chunk_rows' must be a positive integer (got {rows!r})")
        n = num_chunks(shape, rows)
        if not isinstance(crc, list) or len(crc) != n or not all(_is_uint(c) for c in crc):
            raise bad(f"'crc32' must list {n} checksums, one per chunk")
        crc = tuple(crc)
    else:
        if not _is_uint(crc):
            raise bad(f"'crc32' must be an integer (got {crc!r})")
        if not _is_uint(rows):
            raise bad(f"'chunk_rows' must be an integer (got {rows!r})")
    return TensorInfo(tuple(shape), dtype, rows, np.dtype(storage).name, crc)


class CheckpointReader:
    """A committed checkpoint: its tensors (shape, dtype, chunk grid) and attrs, read by rows.

    `bytes_read` counts the chunk bytes this reader has read (metadata not included).
    """

    def __init__(self, uri: str, threads: int = _IO_THREADS) -> None:
        self.uri = uri
        self.fs, self.path = _fs(uri)
        self.local = _is_local(self.fs)
        self.threads = threads
        self.bytes_read = 0
        self._lock = threading.Lock()
        what = f"{uri}/{COMMIT}"
        try:
            data = _read_json(self.fs, f"{self.path}/{COMMIT}", what)
        except FileNotFoundError:
            state = "incomplete (no commit marker)" if self.fs.exists(self.path) else "missing"
            raise CheckpointError(f"{uri}: checkpoint {state}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
            raise CheckpointError(f"{what}: not a k2 commit marker (no 'tensors' object)")
        version = data.get("format_version", 1)
        if not _is_uint(version) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{what}: format version {version!r} is not one this k2 reads "
                f"(1 to {FORMAT_VERSION})"
            )
        self.version: int = version
        self.tensors: dict[str, TensorInfo] = {
            k: _check_entry(what, k, e, version) for k, e in data["tensors"].items()
        }
        self._raw = data["tensors"]
        try:
            group = _read_json(self.fs, f"{self.path}/zarr.json", f"{uri}/zarr.json")
        except FileNotFoundError:
            raise CheckpointError(f"{uri}/zarr.json: missing (not a zarr store)") from None
        attrs = group.get("attributes", {}) if isinstance(group, dict) else None
        if not isinstance(attrs, dict):
            raise CheckpointError(
                f"{uri}/zarr.json: not a zarr group ('attributes' must be an object)"
            )
        self.attrs: dict[str, Any] = attrs

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.uri}: no tensor {key} in this checkpoint") from None

    def read_rows(
        self, group: str, name: str, start: int = 0, stop: int | None = None, verify: bool = True
    ) -> torch.Tensor:
        """Rows [start, stop) of group/name (all when stop is None), reading only their chunks."""
        key = f"{group}/{name}"
        out, jobs = self._plan_read(key, start, stop, verify)
        self._run(jobs)
        return out

    def _plan_read(
        self, key: str, start: int, stop: int | None, verify: bool
    ) -> tuple[torch.Tensor, list[Callable[[], int]]]:
        """The output tensor and one job per chunk that fills it (each returns bytes read)."""
        info = self._info(key)
        shape = info.shape
        total = shape[0] if shape else 1
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(f"{key}: rows [{start}, {stop}) outside [0, {total})")
        if self.version < 2:  # one crc per tensor: verifying it needs the whole tensor
            return self._legacy_rows(key, start, stop, verify)
        storage = np.dtype(info.storage_dtype)
        arr = np.empty((stop - start, *shape[1:]) if shape else (), dtype=storage)
        out = torch.from_numpy(arr)
        out = out.view(info.dtype) if info.dtype in _VIEW_AS else out
        if arr.size == 0 and shape:
            return out, []
        flat = memoryview(arr.reshape(-1)).cast("B")
        row = _row_bytes(shape, storage.itemsize) if shape else storage.itemsize
        rows = info.chunk_rows
        full = rows * row
        jobs = []
        for i in range(start // rows, -(-stop // rows)) if shape else [0]:
            r0 = i * rows
            lo, hi = max(start, r0), min(stop, r0 + rows)
            head = (lo - r0) * row
            parts = [
                (head, None),
                ((hi - lo) * row, flat[(lo - start) * row : (hi - start) * row]),
                (full - head - (hi - lo) * row, None),
            ]
            jobs.append(
                self._chunk_job(key, i, len(shape), parts, full, info.crc32[i] if verify else None)
            )  # type: ignore[index]
        return out, jobs

    def _chunk_job(
        self, key: str, i: int, ndim: int, parts: list[tuple[int, Any]], full: int, crc: int | None
    ) -> Callable[[], int]:
        def job() -> int:
            name = chunk_key(ndim, i)
            path = f"{self.path}/{key}/{name}"
            try:
                f = open(path, "rb", buffering=0) if self.local else self.fs.open(path, "rb")
            except FileNotFoundError:
                raise CheckpointError(
                    f"{self.uri}: tensor {key} cannot be read (chunk {name} missing)"
                ) from None
            got, c = 0, 0
            scratch = None
            with f:
                for length, target in parts:
                    done = 0
                    while done < length:
                        if target is None:
                            if scratch is None:
                                scratch = memoryview(bytearray(min(_BLOCK, full)))
                            view = scratch[: min(_BLOCK, length - done)]
                        else:
                            view = target[done : min(done + _BLOCK, length)]
                        k = f.readinto(view)
                        if not k:
                            break
                        if crc is not None:
                            c = zlib.crc32(view[:k], c)
                        done += k
                    got += done
                    if done < length:
                        break
                extra = f.read(1) if got == full else b""
            if got < full or extra:
                raise CheckpointError(
                    f"{self.uri}: tensor {key} cannot be read (chunk {name} "
                    f"{'truncated' if got < full else 'too long'})"
                )
            if crc is not None and c != crc:
                raise CheckpointError(
                    f"{self.uri}: tensor {key} fails its checksum (chunk {name}, corrupt file)"
                )
            return got

        return job

    def _run(self, jobs: list[Callable[[], int]]) -> None:
        if len(jobs) <= 1 or self.threads <= 1:
            n = sum(j() for j in jobs)
        else:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(jobs))) as pool:
                n = sum(pool.map(lambda j: j(), jobs))
        with self._lock:
            self.bytes_read += n

    def _legacy_rows(
        self, key: str, start: int, stop: int, verify: bool
    ) -> tuple[torch.Tensor, list[Callable[[], int]]]:
        """A version 1 tensor, read whole (its one crc covers it all), then sliced."""
        t, n = _read_v1(self, key, verify)
        with self._lock:
            self.bytes_read += n
        return (t if not t.dim() else t[start:stop]), []

    def read_groups(
        self, groups: list[str] | None = None, verify: bool = True
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Every tensor of the given groups (all when None), read whole: {group: {name: t}}."""
        wanted = [k for k in self.tensors if groups is None or k.split("/", 1)[0] in groups]
        out: dict[str, dict[str, torch.Tensor]] = {}
        jobs: list[Callable[[], int]] = []
        if self.version < 2:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                got = list(
                    pool.map(lambda k: (k, self.read_rows(*k.split("/", 1), verify=verify)), wanted)
                )
        else:
            got = []
            for k in wanted:
                t, js = self._plan_read(k, 0, None, verify)
                got.append((k, t))
                jobs += js
            self._run(jobs)
        for k, t in got:
            group, name = k.split("/", 1)
            out.setdefault(group, {})[name] = t
        return out


def read_rows(
    uri: str, group: str, name: str, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Rows [start, stop) of one tensor of the checkpoint at `uri`, chunk checksums verified."""
    return CheckpointReader(uri).read_rows(group, name, start, stop)


def list_tensors(uri: str) -> dict[str, TensorInfo]:
    """The tensors of the checkpoint at `uri`, keyed 'group/name', with shapes and dtypes."""
    return CheckpointReader(uri).tensors


def load_tensors(
    uri: str, groups: list[str] | None = None, verify: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a committed checkpoint: {group: {name: tensor}} and its attrs; checksums verified."""
    reader = CheckpointReader(uri)
    return reader.read_groups(groups, verify), dict(reader.attrs)


# -- version 1: one crc32 per tensor, chunks cut by bytes, one writer ---------------------------


def _v1_chunk_files(path: str, shape: list[int], rows: int) -> list[tuple[str, int, int]]:
    """(file, first row, rows) of each chunk along dim 0; a 0-d array is the one chunk `c`."""
    if not shape:
        return [(f"{path}/c", 0, 1)]
    tail = "/0" * (len(shape) - 1)
    return [
        (f"{path}/c/{i}{tail}", r, min(rows, shape[0] - r))
        for i, r in enumerate(range(0, shape[0], rows))
    ]


def _read_v1(reader: CheckpointReader, key: str, verify: bool) -> tuple[torch.Tensor, int]:
    """Read one version 1 tensor whole, checking its crc32; returns (tensor, bytes read)."""
    info, uri, meta = reader.tensors[key], reader.uri, reader._raw[key]
    try:
        if reader.local and "chunk_rows" in meta:  # raw chunk files, read in place
            arr = _read_v1_local(reader.path, key, info, uri, verify)
        else:
            import zarr

            arr = zarr.open_array(f"{uri.rstrip('/')}/{key}", mode="r")[...]
            if verify and _crc32(arr) != info.crc32:
                raise CheckpointError(f"{uri}: tensor {key} fails its checksum (corrupt file)")
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or unreadable chunk: name the array, no traceback
        raise CheckpointError(f"{uri}: tensor {key} cannot be read ({_first_line(e)})") from None
    return _from_numpy(arr, _dtype_name(info.dtype), list(info.shape)), arr.nbytes


def _read_v1_local(path: str, key: str, info: TensorInfo, uri: str, verify: bool) -> np.ndarray:
    """Read one array's chunk files straight into a new array, checking the crc32 as it goes."""
    shape, rows = list(info.shape), info.chunk_rows
    arr = np.empty(shape, dtype=np.dtype(info.storage_dtype))
    if arr.size == 0:
        return arr
    flat = memoryview(arr.reshape(-1)).cast("B")
    row = arr.nbytes // shape[0] if shape else arr.nbytes
    crc, base = 0, f"{path}/{key}"
    for name, r0, n in _v1_chunk_files(base, shape, rows):
        want, view = n * row, flat[r0 * row : (r0 + n) * row]
        try:
            with open(name, "rb", buffering=0) as f:
                got = 0
                while got < want:
                    k = f.readinto(view[got : min(got + _BLOCK, want)])
                    if not k:
                        break
                    if verify:
                        crc = zlib.crc32(view[got : got + k], crc)
                    got += k
        except FileNotFoundError:
            raise CheckpointError(
                f"{uri}: tensor {key} cannot be read (chunk {os.path.relpath(name, base)} missing)"
            ) from None
        if got < want:
            raise CheckpointError(
                f"{uri}: tensor {key} cannot be read (chunk "
                f"{os.path.relpath(name, base)} truncated)"
            )
    if verify and crc != info.crc32:
        raise CheckpointError(f"{uri}: tensor {key} fails its checksum (corrupt file)")
    return arr


# -- before a run ----------------------------------------------------------------------------


def check_checkpoint_dir(uri: str) -> None:
    """Raise a one-line CheckpointError unless `uri` is, or can become, a writable directory."""
    try:
        fs, path = _fs(uri)
    except (ValueError, ImportError) as e:
        raise CheckpointError(
            f"{uri}: not a usable checkpoint location ({_first_line(e)})"
        ) from None
    if _is_local(fs) and path.split("/")[:2] in (["", "proc"], ["", "sys"], ["", "dev"]):
        # these accept some writes (root may even create files) but never hold data
        raise CheckpointError(f"{uri}: not a place for checkpoints (a kernel pseudo-filesystem)")
    try:
        if fs.exists(path) and not fs.isdir(path):
            raise CheckpointError(f"{uri}: is a file, not a checkpoint directory")
        made = path
        while made and not fs.exists(os.path.dirname(made) or "/") and _is_local(fs):
            made = os.path.dirname(made)
        if _is_local(fs):
            parent = os.path.dirname(made) or "/"
            if fs.exists(parent) and not fs.isdir(parent):
                raise CheckpointError(f"{uri}: {parent} is a file, not a directory")
        created = not fs.exists(path)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.k2_probe_{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
        if created and _is_local(fs):  # leave no trace of the check
            fs.rm(made, recursive=True)
    except CheckpointError:
        raise
    except (OSError, PermissionError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise CheckpointError(f"{uri}: cannot write checkpoints there ({why})") from None
