"""Splitting long documents into chunks under a token budget, at paragraph then sentence
boundaries (a lone over-long sentence is cut between words).

Tokens are counted approximately as words plus punctuation marks: within ~30% of a BPE count
for English, with no tokenizer to load; budgets leave that margin.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENT = re.compile(r"(?<=[.!?。！？])\s+")


def count_tokens(text: str) -> int:
    """Approximate token count: words and punctuation marks."""
    return len(_TOKEN.findall(text))


def _split_long(sentence: str, budget: int) -> list[str]:
    words, out, cur = sentence.split(), [], []
    for w in words:
        if cur and count_tokens(" ".join(cur + [w])) > budget:
            out.append(" ".join(cur))
            cur = []
        cur.append(w)
    if cur:
        out.append(" ".join(cur))
    return out


def _units(text: str, budget: int) -> list[tuple[str, str]]:
    """(piece, separator before it): paragraphs, or their sentences when a paragraph is long."""
    units: list[tuple[str, str]] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        sep = "\n\n"
        if count_tokens(para) <= budget:
            units.append((para, sep))
            continue
        for sent in _SENT.split(para):
            for piece in [sent] if count_tokens(sent) <= budget else _split_long(sent, budget):
                units.append((piece, sep))
                sep = " "
    return units


def split_chunks(text: str, budget: int) -> list[str]:
    """Chunks of `text`, each at most `budget` approximate tokens, in order; whole paragraphs
    and sentences are kept together whenever they fit."""
    chunks: list[str] = []
    cur = ""
    for piece, sep in _units(text, budget):
        cand = f"{cur}{sep}{piece}" if cur else piece
        if cur and count_tokens(cand) > budget:
            chunks.append(cur)
            cur = piece
        else:
            cur = cand
    if cur:
        chunks.append(cur)
    return chunks
