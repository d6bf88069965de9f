"""Pronounceable invented names built from syllables (no external name lists)."""

from __future__ import annotations

import random

_ONSETS = (
    "b",
    "d",
    "k",
    "l",
    "m",
    "n",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "th",
    "sh",
    "g",
    "f",
    "p",
    "h",
    "j",
    "tr",
    "gr",
    "pl",
    "",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia", "ea")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "th", "x", "nd", "rk")


def word(r: random.Random, syllables: int) -> str:
    """A capitalised invented word of `syllables` syllables."""
    parts = []
    for i in range(syllables):
        onset = r.choice(_ONSETS)
        if i > 0 and not onset:
            onset = r.choice(_ONSETS[:-1])
        coda = r.choice(_CODAS) if i == syllables - 1 else ""
        parts.append(onset + r.choice(_VOWELS) + coda)
    return "".join(parts).capitalize()


def person_name(r: random.Random) -> str:
    """'First Last', two or three syllables each."""
    return f"{word(r, r.choice((2, 2, 3)))} {word(r, r.choice((2, 3, 3)))}"


class UniqueNames:
    """Draws names from a generator until one is new (names never repeat within a world)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def draw(self, r: random.Random, make) -> str:
        for _ in range(1000):
            name = make(r)
            low = name.lower()
            if low not in self.used:
                self.used.add(low)
                return name
        raise RuntimeError("name space exhausted")
