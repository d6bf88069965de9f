"""Deterministic helpers shared by the built-in corpus generators (no global RNG, no hash())."""

from __future__ import annotations

import hashlib
import random

from k2_core.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that is the same on every machine and every run."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def split_of(key: str, val: float, test: float) -> str:
    """The split of `key`: the fraction `val` goes to val, `test` to test, the rest to train."""
    u = (stable_hash("k2-split", key) % 1_000_000) / 1_000_000
    if u < val:
        return "val"
    if u < val + test:
        return "test"
    return "train"


def rng(*parts: object) -> random.Random:
    """A random.Random seeded from `parts` (string seeding is stable across runs and machines)."""
    return random.Random("\x1f".join(str(p) for p in parts))


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise ConfigError(f"split must be one of {', '.join(allowed)} (got {split!r})")


def check_scale(scale: float) -> None:
    if not scale > 0:
        raise ConfigError(f"scale must be > 0 (got {scale})")
