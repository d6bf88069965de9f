"""Checkpoints as zarr v3 stores over fsspec: one array per tensor, a commit marker written last.

Layout of a checkpoint at URI:
    zarr.json                 group; attrs hold the format tag and caller metadata (JSON)
    <group>/<tensor name>     one uncompressed array per tensor (weights barely compress)
    k2_commit.json            written last: tensor names, shapes, dtypes and crc32 checksums

A reader refuses a store without the marker, so a killed writer never leaves a checkpoint
that looks complete. No pickle: tensors are raw arrays, metadata is JSON.
"""

from __future__ import annotations

import json
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
    root = zarr.open_group(uri, mode="w")
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **(attrs or {})})
    manifest: dict[str, dict[str, Any]] = {}

    def write(item: tuple[str, str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        group, name, tensor = item
        arr = _to_numpy(tensor)
        z = root.create_array(
            f"{group}/{name}", shape=arr.shape, dtype=arr.dtype,
            chunks=_chunks(arr.shape, arr.itemsize), compressors=None, fill_value=0,
        )
        z[...] = arr
        meta = {
            "shape": list(arr.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "crc32": _crc32(arr),
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

    def read(key: str) -> tuple[str, torch.Tensor]:
        meta = manifest[key]
        try:
            arr = root[key][...]
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
