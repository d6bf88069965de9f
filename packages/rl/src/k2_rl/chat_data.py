"""The `chat` dataset: conversations packed into rows, loss on assistant tokens only.

Each conversation is encoded with K2's chat format (`k2_data.chat.encode_chat`), whose mask
marks the tokens the model must learn (each assistant body and its closing <|im_end|>). A
conversation of n tokens gives n - 1 (input, label) positions; several are packed per row with
`segment_ids` (attention stays within a conversation) and `position_ids` restarting at 0, and
the row's tail is padding with label -100. Rows are built once and visited in a seeded
permutation per epoch; `state_dict` is (epoch, position), so a resume continues exactly. Data
ranks share the order: each step's global batch is the same rows in any layout.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from k2_core.errors import CheckpointError, ConfigError

from .options import ChatDataOptions

STATE_VERSION = 1


# --- the tokenizer of a checkpoint ------------------------------------------------------------


def tokenizer_uri_of(run_cfg: Any) -> str:
    """The tokenizer folder URI of the run that wrote a checkpoint (from its data section)."""
    if run_cfg is None:
        raise CheckpointError(
            "the checkpoint records no run config, so its tokenizer is unknown;"
            " set the tokenizer URI explicitly"
        )
    opts = dict(run_cfg.data.options)
    if opts.get("tokenizer"):
        return str(opts["tokenizer"])
    if run_cfg.data.dataset == "packed":
        from k2_data.loader import read_manifest
        from k2_data.prepare import default_dataset_uri

        uri = opts.get("uri") or default_dataset_uri()
        manifest = read_manifest(uri)
        return f"{uri.rstrip('/')}/{manifest['tokenizer']['path']}"
    raise CheckpointError(
        f"cannot tell the tokenizer of a {run_cfg.data.dataset!r} run; "
        "set the tokenizer URI explicitly"
    )


def load_tokenizer_of(run_cfg: Any, uri: str | None = None) -> Any:
    """The tokenizer at `uri`, else the one the checkpoint's run trained with."""
    from k2_data.tokenizer import load_tokenizer

    return load_tokenizer(uri or tokenizer_uri_of(run_cfg))


# --- conversations ----------------------------------------------------------------------------


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[bool]]:
    """(token ids, assistant mask) of one conversation in K2's chat format."""
    from k2_data.chat import encode_chat

    ids, mask = encode_chat(tokenizer, messages, tools)
    return list(ids), [bool(m) for m in mask]


def math_conversation(question: str, solution: str) -> list[dict[str, Any]]:
    """A user question and the worked solution as the assistant's answer."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]


def builtin_math_records(
    split: str, n: int, difficulty: tuple[int, int], kinds: Iterable[str], seed: int = 0
) -> list[dict[str, Any]]:
    """`n` built-in arithmetic conversations with worked solutions (train/val/test disjoint)."""
    from k2_data.corpus.mathgen import math_problems

    probs = math_problems(split, seed=seed, n=n, difficulty=tuple(difficulty), kinds=tuple(kinds))
    return [{"messages": math_conversation(p.question, p.solution)} for p in probs]


def read_records(uri: str) -> list[dict[str, Any]]:
    """Every record of the JSON Lines / Parquet files matching `uri` (fsspec, globs allowed)."""
    import fsspec

    files = fsspec.open_files(uri, "rb")
    if not files:
        raise ConfigError(f"data.options.uri: no files match {uri!r}")
    out: list[dict[str, Any]] = []
    for f in files:
        path = f.path
        with f as fh:
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq

                out += pq.read_table(fh).to_pylist()
                continue
            for i, line in enumerate(fh.read().decode("utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ConfigError(f"{path}:{i + 1}: not JSON ({e})") from None
    for i, r in enumerate(out):
        if not isinstance(r, dict) or not isinstance(r.get("messages"), list):
            raise ConfigError(
                f"{uri}: record {i} has no 'messages' list; each line must be "
                "{'messages': [...], 'tools': [...]}"
            )
    return out


def _split_of(record: dict[str, Any], val_fraction: float) -> str:
    key = json.dumps(record.get("messages"), sort_keys=True).encode()
    return "val" if (zlib.crc32(key) % 10_000) < val_fraction * 10_000 else "train"


# --- packing ----------------------------------------------------------------------------------


def shift_labels(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """(inputs, labels): inputs ids[:-1]; labels[t] = ids[t+1] where that token is learned,
    else -100."""
    return ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]


def pack_rows(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool = True
) -> dict[str, np.ndarray]:
    """Greedy in-order packing of (inputs, labels) examples into rows of `seq_len`.

    Returns int64 arrays [rows, seq_len]: input_ids, labels, segment_ids, position_ids.
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len
    for inp, lab in examples:
        inp, lab = inp[:seq_len], lab[:seq_len]
        if not pack or used + len(inp) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inp, lab))
        used += len(inp)
    n = len(rows)
    out = {
        k: np.zeros((n, seq_len), dtype=np.int64)
        for k in ("input_ids", "labels", "segment_ids", "position_ids")
    }
    out["input_ids"][:] = pad_id
    out["labels"][:] = -100
    for r, parts in enumerate(rows):
        pos = 0
        for s, (inp, lab) in enumerate(parts):
            end = pos + len(inp)
            out["input_ids"][r, pos:end] = inp
            out["labels"][r, pos:end] = lab
            out["segment_ids"][r, pos:end] = s
            out["position_ids"][r, pos:end] = np.arange(len(inp))
            pos = end
        # padding is a segment of its own, so real tokens never attend to it
        out["segment_ids"][r, pos:] = len(parts)
        out["position_ids"][r, pos:] = np.arange(seq_len - pos)
    return out


class ChatDataset:
    """Packed chat rows for one split, batched, endless, seeded and resumable."""

    def __init__(
        self,
        options: ChatDataOptions,
        *,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenizer: Any = None,
    ):
        if options.uri is None and options.builtin is None:
            raise ConfigError("data.options: give a `uri` of chat files or `builtin: math`")
        if tokenizer is None:
            if options.tokenizer is None:
                raise ConfigError(
                    "data.options.tokenizer: no tokenizer; `k2 sft` fills in the "
                    "init checkpoint's, elsewhere give its folder URI"
                )
            from k2_data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(options.tokenizer)
        self.tokenizer, self.options = tokenizer, options
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.split = "val" if split == "val" else "train"
        records = self._records(options)
        self.truncated = 0
        examples = []
        for rec in records:
            ids, mask = encode_conversation(tokenizer, rec["messages"], rec.get("tools"))
            if len(ids) - 1 > seq_len:
                self.truncated += 1
            if len(ids) >= 2 and any(mask[1:]):
                examples.append(shift_labels(ids, mask))
        if not examples:
            raise ConfigError(f"data.options: no {self.split} conversation has assistant tokens")
        self.n_conversations = len(examples)
        self.labelled_tokens = sum(sum(1 for x in lab if x != -100) for _, lab in examples)
        packed = pack_rows(examples, seq_len, tokenizer.pad_id, options.pack)
        # every rank keeps every row and walks the same global order; rank r takes the r-th
        # batch_size rows of each window of world_size x batch_size, so a step's global batch
        # is the same rows in any layout (one process with grad_accum = world_size included)
        self.rows = {k: torch.from_numpy(v) for k, v in packed.items()}
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0

    def _records(self, o: ChatDataOptions) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = []
        if o.uri:
            recs += [r for r in read_records(o.uri) if _split_of(r, o.val_fraction) == self.split]
        if o.builtin == "math":
            n = o.builtin_n if self.split == "train" else max(1, int(o.builtin_n * 0.05))
            recs += builtin_math_records(self.split, n, o.difficulty, o.kinds, self.seed)
        return recs

    @property
    def n_rows(self) -> int:
        """Packed rows (every rank holds them all)."""
        return int(self.rows["input_ids"].shape[0])

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.options.shuffle:
            return torch.arange(self.n_rows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=g)

    def __iter__(self) -> ChatDataset:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need = self.batch_size * self.world_size  # the global window of this step's batch
        order = self._order(self.epoch)
        idx, got = [], 0
        while got < need:
            if self.pos >= self.n_rows:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order(self.epoch)
            take = min(need - got, self.n_rows - self.pos)
            idx.append(order[self.pos : self.pos + take])
            self.pos += take
            got += take
        mine = self.rank * self.batch_size
        sel = torch.cat(idx)[mine : mine + self.batch_size]
        return {k: v[sel] for k, v in self.rows.items()}

    def state_dict(self) -> dict[str, Any]:
        """JSON state: epoch and position (rows consumed in this epoch)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`."""
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def build_chat(
    *,
    options: ChatDataOptions,
    split: str = "train",
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> ChatDataset:
    """The `chat` dataset slot factory."""
    return ChatDataset(
        options,
        split=split,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
