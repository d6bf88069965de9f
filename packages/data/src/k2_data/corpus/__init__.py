"""The built-in corpus: real training text on a fresh machine with no internet.

Three domains, all deterministic given (split, seed, scale):

- `code`: the running interpreter's own standard-library .py files (~4M characters at scale 1);
- `math`: generated arithmetic, equations and word problems with worked solutions ending in
  `Answer: <n>` (~1.5M characters at scale 1); see `math_problems`, `check_math_answer`;
- `knowledge`: encyclopedic documents about a generated world (~1M characters at scale 1);
  see `World`, `builtin_world` and `World.questions` for held-out factual questions.

    from k2_data.corpus import builtin_documents
    for doc in builtin_documents("math", split="train", seed=0, scale=0.1):
        print(doc.id, len(doc.text))
"""

from __future__ import annotations

from collections.abc import Iterator

from k2_core.errors import ConfigError

from ..documents import Document
from ._util import SPLITS, check_scale, check_split
from .code import code_documents, stdlib_files, stdlib_root
from .knowledge import QA, STYLES, Fact, World, builtin_world, knowledge_documents
from .mathgen import (
    MathProblem,
    check_math_answer,
    extract_answer,
    iter_math_problems,
    math_problems,
)

DOMAINS: tuple[str, ...] = ("code", "math", "knowledge")


def builtin_documents(
    domain: str, *, split: str = "train", seed: int = 0, scale: float = 1.0
) -> Iterator[Document]:
    """Documents of one built-in domain (`code`, `math`, `knowledge`) and split (train/val/test).

    `scale` sizes the corpus (1.0: a few million characters over the three domains, enough for
    a tiny model trained in minutes on a CPU); `seed` picks another draw of the same distribution.
    Splits never share a document (code by path, math by question, knowledge by world).
    """
    check_split(split)
    check_scale(scale)
    if domain == "code":
        return code_documents(split=split, seed=seed, scale=scale)
    if domain == "math":
        from .mathgen import math_documents

        return math_documents(split=split, seed=seed, scale=scale)
    if domain == "knowledge":
        return knowledge_documents(split=split, seed=seed, scale=scale)
    raise ConfigError(f"unknown built-in corpus domain {domain!r}; domains: {', '.join(DOMAINS)}")


__all__ = [
    "DOMAINS",
    "QA",
    "SPLITS",
    "STYLES",
    "Fact",
    "MathProblem",
    "World",
    "builtin_documents",
    "builtin_world",
    "check_math_answer",
    "code_documents",
    "extract_answer",
    "iter_math_problems",
    "knowledge_documents",
    "math_problems",
    "stdlib_files",
    "stdlib_root",
]
