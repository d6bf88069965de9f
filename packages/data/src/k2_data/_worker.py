"""Tokenizer worker processes: import-light (stdlib + the tokenizer library only), so a
spawned worker starts fast; results travel as packed uint32/int64 bytes."""

from __future__ import annotations

import base64
import os
from array import array
from typing import Any

_ENCODE: Any = None


def init(name: str, state: dict[str, Any], threads: int) -> None:
    """Pool initializer: rebuild the tokenizer's raw encoder from `Tokenizer.state()`."""
    import signal

    # Ctrl-C reaches the whole process group: the main process handles it (cleans up, one
    # line) and shuts the pool down; a worker printing its own KeyboardInterrupt would not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    global _ENCODE
    _ENCODE = make_encoder(name, state)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this worker when the main process is gone (SIGKILL): a pool worker would otherwise
    wait forever on its task queue, whose write end it holds itself."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="k2-parent-watch", daemon=True).start()


def make_encoder(name: str, state: dict[str, Any]) -> Any:
    """A function list[str] -> list[list[int]] (special-token strings encoded as text)."""
    files = state["files"]
    if name == "bpe":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(files["tokenizer.json"].decode())
        tok.encode_special_tokens = True
        fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in fast(texts, add_special_tokens=False)]

        return encode
    if name == "tiktoken":
        import tiktoken

        ranks = {}
        for line in files["tokenizer.tiktoken"].splitlines():
            if line.strip():
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64)] = int(rank)
        enc = tiktoken.Encoding(
            "k2",
            pat_str=state["pattern"],
            mergeable_ranks=ranks,
            special_tokens=state["special_tokens"],
        )
        return enc.encode_ordinary_batch
    raise ValueError(f"no worker encoder for tokenizer {name!r}")


def pack(ids: list[list[int]]) -> tuple[bytes, bytes]:
    """(uint32 tokens, int64 lengths) as little-endian bytes."""
    flat = array("I")
    if flat.itemsize != 4 or array("I", [1]).tobytes() != b"\x01\x00\x00\x00":
        raise RuntimeError("platform without 32-bit little-endian unsigned ints")
    for x in ids:  # fromlist: one C loop per document, no per-token Python iteration
        flat.fromlist(x)
    lengths = array("q", map(len, ids))
    return flat.tobytes(), lengths.tobytes()


def ping() -> None:
    """Worker task that does nothing: submitted once per worker to start the pool early."""


def encode(texts: list[str]) -> tuple[bytes, bytes]:
    """Worker task: tokens and lengths of a batch of documents."""
    return pack(_ENCODE(texts))
