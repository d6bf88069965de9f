"""Helpers of the k2-data tests: small corpora in each supported format."""

from __future__ import annotations

import json
import random

WORDS = (
    "alpha beta gamma delta expert router token muon clip sparse dense layer norm "
    "attention latent rotary query key value batch shard"
).split()


def make_texts(n: int, seed: int = 0, lo: int = 5, hi: int = 80) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        for i in range(n)
    ]


def write_jsonl(path, texts, id_prefix="d", field="text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"{id_prefix}{i}", field: t}) + "\n")


def small_cfg(sources, out, **kw):
    from k2_data.config import load_prepare_config

    base = {
        "sources": sources,
        "tokenizer": {"name": "bpe", "options": {"vocab_size": 400}},
        "seq_len": 32,
        "workers": 0,
        "shard_docs": 64,
        "out": out,
    }
    base.update(kw)
    return load_prepare_config(base)


def counting_fs() -> type:
    """A local filesystem under protocol `k2count` that counts every byte read through it."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class Counting(LocalFileSystem):
        protocol = ("k2count",)
        read = 0

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode, **kwargs)
            inner = f.read

            def read(*args):
                data = inner(*args)
                Counting.read += len(data)
                return data

            f.read = read
            return f

    fsspec.register_implementation("k2count", Counting, clobber=True)
    return Counting
