"""Checkpoints as zarr v3 stores over fsspec: one array per tensor, a commit marker written last.

Layout of a checkpoint at URI:
    zarr.json                 group; attrs hold the format tag and caller metadata (JSON)
    <group>/<tensor name>     one uncompressed array per tensor (weights barely compress)
    k2_commit.json            written last: tensor names, shapes, dtypes and crc32 checksums

A reader refuses a store without the marker, so a killed writer never leaves a checkpoint
that looks complete. No pickle: tensors are raw arrays, metadata is JSON.

On a local filesystem the chunks are written and read as plain files, straight from and into
the tensors' memory: an uncompressed zarr v3 chunk is the array's little-endian bytes (edge
chunks padded to the full chunk shape), so any zarr reader still opens the store, and k2
skips zarr's per-chunk decode and copies. Other filesystems go through zarr over fsspec.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "k2-checkpoint"
FORMAT_VERSION = 1
COMMIT = "k2_commit.json"
_CHUNK_BYTES = 64 << 20
_IO_THREADS = 8
_BLOCK = 1 << 20  # read/write and checksum in 1 MiB blocks, while the block is in cache

# dtypes numpy has no name for travel as same-width integers, tagged in the marker.
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
_BY_NAME = {str(t).removeprefix("torch."): t for t in _VIEW_AS}


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


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Split along dim 0 so a chunk stays under 64 MiB: ranks read only the rows they own."""
    if not shape:
        return ()
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return (max(1, min(shape[0], _CHUNK_BYTES // row)), *shape[1:])


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


# -- the local fast path: raw chunk files, written and read in place --------------------------

def _array_json(arr: np.ndarray, chunks: tuple[int, ...]) -> dict[str, Any]:
    """zarr v3 metadata of an uncompressed array (what `zarr.create_array` writes)."""
    return {
        "shape": list(arr.shape), "data_type": arr.dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
    }


def _chunk_files(path: str, shape: list[int], chunk_rows: int) -> list[tuple[str, int, int]]:
    """(file, first row, rows) of each chunk along dim 0; a 0-d array is the one chunk `c`."""
    if not shape:
        return [(f"{path}/c", 0, 1)]
    tail = "/0" * (len(shape) - 1)
    return [(f"{path}/c/{i}{tail}", r, min(chunk_rows, shape[0] - r))
            for i, r in enumerate(range(0, shape[0], chunk_rows))]


def _write_local(path: str, arr: np.ndarray, chunks: tuple[int, ...]) -> int:
    """Write one array as zarr v3 metadata plus raw chunk files; returns the bytes' crc32."""
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/zarr.json", "w") as f:
        json.dump(_array_json(arr, chunks), f)
    if arr.size == 0:
        return zlib.crc32(b"")
    flat = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
    row = arr.nbytes // arr.shape[0] if arr.ndim else arr.nbytes
    full, crc = row * (chunks[0] if arr.ndim else 1), 0
    for name, r0, rows in _chunk_files(path, list(arr.shape), chunks[0] if arr.ndim else 1):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "wb", buffering=0) as f:
            for b in range(r0 * row, (r0 + rows) * row, _BLOCK):  # checksum while cache-hot
                block = flat[b:min(b + _BLOCK, (r0 + rows) * row)]
                crc = zlib.crc32(block, crc)
                f.write(block)
            if rows * row < full:  # zarr's edge chunks are full-size: pad with zeros
                f.truncate(full)
    return crc


def _read_local(path: str, key: str, meta: dict[str, Any], uri: str,
                verify: bool) -> np.ndarray:
    """Read one array's chunk files straight into a new array, checking the crc32 as it goes."""
    shape, rows = meta["shape"], meta["chunk_rows"]
    dtype = np.dtype(meta["storage_dtype"])
    arr = np.empty(shape, dtype=dtype)
    if arr.size == 0:
        return arr
    flat = memoryview(arr.reshape(-1)).cast("B")
    row = arr.nbytes // shape[0] if shape else arr.nbytes
    crc, base = 0, f"{path}/{key}"
    for name, r0, n in _chunk_files(base, shape, rows):
        want, view = n * row, flat[r0 * row:(r0 + n) * row]
        try:
            with open(name, "rb", buffering=0) as f:
                got = 0
                while got < want:
                    k = f.readinto(view[got:min(got + _BLOCK, want)])
                    if not k:
                        break
                    if verify:
                        crc = zlib.crc32(view[got:got + k], crc)
                    got += k
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: tensor {key} cannot be read (chunk "
                                  f"{os.path.relpath(name, base)} missing)") from None
        if got < want:
            raise CheckpointError(f"{uri}: tensor {key} cannot be read (chunk "
                                  f"{os.path.relpath(name, base)} truncated)")
    if verify and crc != meta["crc32"]:
        raise CheckpointError(f"{uri}: tensor {key} fails its checksum (corrupt file)")
    return arr


def is_committed(uri: str) -> bool:
    """Whether a complete checkpoint exists at `uri`."""
    fs, path = _fs(uri)
    return fs.exists(f"{path}/{COMMIT}")


def save_tensors(
    uri: str, groups: dict[str, dict[str, torch.Tensor]], attrs: dict[str, Any] | None = None
) -> None:
    """Write named groups of tensors and JSON `attrs` to `uri`, then the commit marker."""
    import zarr

    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    local = _is_local(fs)
    root = zarr.open_group(uri, mode="w")
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **(attrs or {})})
    for group in groups:
        root.require_group(group)
    manifest: dict[str, dict[str, Any]] = {}

    def write(item: tuple[str, str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        group, name, tensor = item
        arr = _to_numpy(tensor)
        chunks = _chunks(arr.shape, arr.itemsize)
        if local:
            crc = _write_local(f"{path}/{group}/{name}", arr, chunks)
        else:
            z = root.create_array(f"{group}/{name}", shape=arr.shape, dtype=arr.dtype,
                                  chunks=chunks, compressors=None, fill_value=0)
            z[...] = arr
            crc = _crc32(arr)
        meta = {
            "shape": list(arr.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "storage_dtype": arr.dtype.name,
            "chunk_rows": chunks[0] if chunks else 1,
            "crc32": crc,
        }
        return f"{group}/{name}", meta

    items = [(g, n, t) for g, ts in groups.items() for n, t in ts.items()]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:  # zarr I/O releases the GIL
        manifest.update(pool.map(write, items))
    with fs.open(f"{path}/{COMMIT}", "w") as f:
        json.dump({"format": FORMAT, "tensors": manifest}, f)


def load_tensors(
    uri: str, groups: list[str] | None = None, verify: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a committed checkpoint: {group: {name: tensor}} and its attrs; checksums verified."""
    import zarr

    fs, path = _fs(uri)
    try:
        with fs.open(f"{path}/{COMMIT}", "r") as f:
            manifest = json.load(f)["tensors"]
    except FileNotFoundError:
        what = "incomplete (no commit marker)" if fs.exists(path) else "missing"
        raise CheckpointError(f"{uri}: checkpoint {what}") from None
    root = zarr.open_group(uri, mode="r")
    wanted = [k for k in manifest if groups is None or k.split("/", 1)[0] in groups]
    local = _is_local(fs)

    def read(key: str) -> tuple[str, torch.Tensor]:
        meta = manifest[key]
        try:
            if local and "chunk_rows" in meta:  # raw chunk files, read in place
                return key, _from_numpy(_read_local(path, key, meta, uri, verify),
                                        meta["dtype"], meta["shape"])
            arr = root[key][...]
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or unreadable chunk: name the array, no traceback
            raise CheckpointError(f"{uri}: tensor {key} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'corrupt chunk'})") from None
        if verify and _crc32(arr) != meta["crc32"]:
            raise CheckpointError(f"{uri}: tensor {key} fails its checksum (corrupt file)")
        return key, _from_numpy(arr, meta["dtype"], meta["shape"])

    out: dict[str, dict[str, torch.Tensor]] = {}
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        for key, t in pool.map(read, wanted):
            group, name = key.split("/", 1)
            out.setdefault(group, {})[name] = t
    return out, dict(root.attrs)
