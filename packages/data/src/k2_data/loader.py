"""The stateful loader over a packed dataset (`dataset` slot, name `packed`).

On-disk contract (written by `k2 data prepare`): a zarr v3 group at `uri` (any fsspec URI)
with subgroups `train` and `val`, each holding

- `tokens`     uint32 [n_seq, seq_len + 1], chunked in whole rows;
- `doc_starts` int64 [n_docs], offsets into the split's flattened token stream
  (`tokens.reshape(-1)`, row after row) where each document begins;

and `uri/manifest.json` with at least `complete: true`, `seq_len`, `eos_id`, `vocab_size`.

Each epoch visits the sequences in a permutation seeded by (seed, epoch). A global batch is
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

import json
import queue
import threading
import warnings
from typing import Any

import numpy as np
import torch
from k2_core.errors import ConfigError

from .loader_options import PackedOptions

STATE_VERSION = 1


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a complete packed dataset at `uri`; ConfigError when absent or incomplete."""
    import fsspec

    path = uri.rstrip("/") + "/manifest.json"
    try:
        with fsspec.open(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{uri}: no packed dataset here (manifest.json missing); run `k2 data prepare` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{uri}: cannot read manifest.json ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise ConfigError(
            f"{uri}: packed dataset is incomplete (manifest.json lacks complete: true); "
            "re-run `k2 data prepare`"
        )
    if manifest.get("format", "k2-packed") != "k2-packed":
        raise ConfigError(f"{uri}: format {manifest['format']!r}, expected 'k2-packed'")
    for key in ("seq_len", "eos_id", "vocab_size"):
        if key not in manifest:
            raise ConfigError(f"{uri}: manifest.json lacks {key!r}")
    return manifest


def _default_uri() -> str:
    try:
        from .prepare import default_dataset_uri
    except ImportError as exc:
        raise ConfigError(f"no dataset uri given and no default is available ({exc})") from None
    return str(default_dataset_uri())


class _Rows:
    """Row access to a split's tokens: in memory when small, else straight from the zarr array."""

    def __init__(self, tokens: Any, in_memory: bool) -> None:
        self.shape = tuple(tokens.shape)
        self.in_memory = in_memory
        self._tokens = tokens[...] if in_memory else tokens

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.in_memory:
            return self._tokens[rows]
        if len(rows) == 0:
            return np.empty((0, self.shape[1]), dtype=np.uint32)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo == len(rows):  # a contiguous block (no shuffle): one chunk-aligned slice
            block = np.asarray(self._tokens[lo:hi])
            return block[rows - lo]
        order = np.argsort(rows, kind="stable")
        data = np.asarray(self._tokens.get_orthogonal_selection((rows[order], slice(None))))
        out = np.empty_like(data)
        out[order] = data
        return out


class _Reader:
    """Pure batch production from (epoch, position): no thread, no consumed state.

    The prefetch thread holds only this object, never the PackedDataset, so dropping the
    dataset collects it and stops the thread.
    """

    def __init__(self, rows: _Rows, doc_starts: np.ndarray, seq_len: int, options: PackedOptions,
                 rank: int, world_size: int) -> None:
        self.rows = rows
        self.doc_starts = doc_starts
        self.seq_len = seq_len
        self.n = rows.shape[0]
        self.opt = options
        self.seed = options.seed
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def global_batch(self) -> int:
        return self.world_size * self.opt.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._perm_epoch != epoch:
                if self.opt.shuffle:
                    s = self.seed % 2**64
                    gen = np.random.Generator(np.random.PCG64([s & 0xFFFFFFFF, s >> 32, epoch]))
                    self._perm = gen.permutation(self.n)
                else:
                    self._perm = np.arange(self.n)
                self._perm_epoch = epoch
            return self._perm

    def normalise(self, epoch: int, pos: int) -> tuple[int, int]:
        """Roll over to the next epoch when no (full, with drop_last) global batch is left."""
        left = self.n - pos
        if left <= 0 or (self.opt.drop_last and left < self.global_batch):
            return epoch + 1, 0
        return epoch, pos

    def rows_at(self, epoch: int, pos: int) -> tuple[np.ndarray, int, int]:
        """This rank's rows of the global batch at (epoch, pos), and the state after it."""
        epoch, pos = self.normalise(epoch, pos)
        end = min(pos + self.global_batch, self.n)
        chunk = self.permutation(epoch)[pos:end]
        m, ws, r = len(chunk), self.world_size, self.rank
        if m == self.global_batch:
            b = self.opt.batch_size
            mine = chunk[r * b:(r + 1) * b]
        else:  # the short final batch of an epoch (drop_last=False): split as evenly as possible
            start = r * (m // ws) + min(r, m % ws)
            mine = chunk[start:start + m // ws + (1 if r < m % ws else 0)]
        return mine, epoch, end

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        toks = self.rows.read(rows).astype(np.int64, copy=False)
        L = self.seq_len
        out = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(toks[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(toks[:, 1:])),
        }
        if self.opt.doc_mask:
            row_start = rows.astype(np.int64)[:, None] * (L + 1)
            offsets = row_start + np.arange(L, dtype=np.int64)[None, :]
            doc = np.searchsorted(self.doc_starts, offsets, side="right") - 1  # global doc index
            out["segment_ids"] = torch.from_numpy(doc - doc[:, :1])
            if self.opt.position_ids:
                starts = self.doc_starts[np.clip(doc, 0, None)] if len(self.doc_starts) else row_start
                starts = np.where(doc >= 0, starts, row_start)
                # a document continued from the previous row restarts at 0 with the row
                out["position_ids"] = torch.from_numpy(offsets - np.maximum(starts, row_start))
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
            target=self._run, args=(reader, epoch, pos, self._q, self._stop),
            name="k2-packed-prefetch", daemon=True,
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

    def __init__(self, options: PackedOptions | None = None, *, rank: int = 0, world_size: int = 1) -> None:
        options = options or PackedOptions()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size) (got rank {rank}, world size {world_size})")
        import zarr

        self.options = options
        self.uri = options.uri or _default_uri()
        self.manifest = read_manifest(self.uri)
        self.seq_len = int(self.manifest["seq_len"])
        self.eos_id = int(self.manifest["eos_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
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
        try:
            tokens, doc_starts = group["tokens"], group["doc_starts"]
        except KeyError as exc:
            raise ConfigError(f"{self.uri}/{options.split}: missing array {exc}") from None
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len + 1:
            raise ConfigError(
                f"{self.uri}/{options.split}: tokens has shape {tuple(tokens.shape)}, "
                f"expected [n_seq, {self.seq_len + 1}] for seq_len {self.seq_len}"
            )
        nbytes = tokens.shape[0] * tokens.shape[1] * np.dtype(tokens.dtype).itemsize
        in_memory = nbytes <= options.in_memory_max_mb * 2**20
        starts = np.asarray(doc_starts[...], dtype=np.int64) if options.doc_mask else np.zeros(0, np.int64)
        self._reader = _Reader(_Rows(tokens, in_memory), starts, self.seq_len, options, rank, world_size)
        self.rank, self.world_size = rank, world_size
        n = self._reader.n
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
        return self._reader.n

    @property
    def global_batch_size(self) -> int:
        return self._reader.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank."""
        n, gb = self._reader.n, self._reader.global_batch
        return n // gb if self.options.drop_last else -(-n // gb)

    @property
    def epoch(self) -> int:
        return self._reader.normalise(self._epoch, self._pos)[0]

    @property
    def in_memory(self) -> bool:
        return self._reader.rows.in_memory

    # --- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> PackedDataset:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.options.prefetch == 0:
            batch, epoch, pos = self._reader.produce(self._epoch, self._pos)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._reader, self._epoch, self._pos, self.options.prefetch)
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
            old_ws, old_b = int(state["world_size"]), int(state.get("batch_size", self.options.batch_size))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"packed dataset state is malformed ({exc!r})") from None
        n = state.get("n_sequences", self._reader.n)
        if n != self._reader.n:
            raise ConfigError(
                f"packed dataset state is for {n} sequences, but {self.uri}/{self.options.split} has "
                f"{self._reader.n}: the dataset changed"
            )
        if state.get("shuffle", self.options.shuffle) != self.options.shuffle:
            raise ConfigError(f"packed dataset state has shuffle={state['shuffle']}, options have "
                              f"shuffle={self.options.shuffle}")
        if epoch < 0 or not 0 <= pos <= self._reader.n:
            raise ConfigError(f"packed dataset state out of range (epoch {epoch}, position {pos})")
        gb = self._reader.global_batch
        if pos % gb and self.options.drop_last and self._reader.n - pos < old_ws * old_b:
            epoch, pos = epoch + 1, 0  # saved at the end of an epoch: its tail was dropped
        if pos % gb and pos != self._reader.n:
            raise ConfigError(
                f"cannot resume the packed dataset at sequence {pos} of epoch {epoch} with world size "
                f"{self.world_size} x batch {self.options.batch_size} (global batch {gb}): it was saved "
                f"with world size {old_ws} x batch {old_b} (global batch {old_ws * old_b}), and the "
                f"position must be a multiple of the new global batch"
            )
        self.close()
        self._reader.seed = seed
        self._reader._perm_epoch = None
        self._epoch, self._pos = epoch, pos


def make_loader(options: PackedOptions, rank: int = 0, world_size: int = 1) -> PackedDataset:
    """A PackedDataset for `rank` of `world_size`."""
    return PackedDataset(options, rank=rank, world_size=world_size)


def build_packed(*, options: PackedOptions, rank: int = 0, world_size: int = 1, split: str | None = None,
                 batch_size: int | None = None, seq_len: int | None = None,
                 seed: int | None = None) -> PackedDataset:
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
                f"data.options.batch_size is {options.batch_size} but the run's micro batch size is "
                f"{batch_size}; set only train.micro_batch_size"
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
