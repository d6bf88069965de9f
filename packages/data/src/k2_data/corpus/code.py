"""The `code` domain: the Python standard library's own source files, read from this interpreter.

Every machine that runs k2 has them, so this is real, human-written code with no download.
Files are those under `sysconfig.get_paths()["stdlib"]`, without site-packages, test suites,
codec tables and other generated data. Each file's split is fixed by a stable hash of its
relative path (2% val, 1% test); `scale` caps the corpus at about `CODE_CHARS * scale`
characters, choosing whole files in a seeded order, and yields them sorted by path.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from ..documents import Document
from ._util import check_scale, check_split, split_of, stable_hash

CODE_CHARS = 4_000_000  # characters of code (all splits together) at scale 1
MAX_FILE_CHARS = 150_000  # larger files are mostly data (tables, generated code)
VAL_FRACTION = 0.02
TEST_FRACTION = 0.01

# Directory names skipped anywhere below the stdlib root.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "ensurepip",
    }
)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def _stdlib_files(root: str) -> tuple[tuple[str, int], ...]:
    """(relative path, size in bytes) of every eligible .py file under `root`, sorted."""
    out: list[tuple[str, int]] = []
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "."))
        )
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            full = Path(dirpath) / name
            try:
                size = full.stat().st_size
            except OSError:
                continue
            if 0 < size <= MAX_FILE_CHARS:
                out.append((full.relative_to(base).as_posix(), size))
    out.sort()
    return tuple(out)


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the eligible standard-library source files, sorted."""
    return [p for p, _ in _stdlib_files(str(root or stdlib_root()))]


def code_documents(
    *, split: str = "train", seed: int = 0, scale: float = 1.0, root: Path | None = None
) -> Iterator[Document]:
    """The stdlib source files of `split` (id = path relative to the stdlib root), sorted by id."""
    check_split(split)
    check_scale(scale)
    base = root or stdlib_root()
    files = _stdlib_files(str(base))
    budget = CODE_CHARS * scale
    # Whole files in a seeded order until the budget is spent: the same selection for every
    # split, so train, val and test of one (seed, scale) come from one corpus.
    chosen: list[str] = []
    total = 0
    for rel, size in sorted(files, key=lambda f: stable_hash("k2-code", seed, f[0])):
        if total >= budget:
            break
        chosen.append(rel)
        total += size
    for rel in sorted(chosen):
        if split_of(f"code:{rel}", VAL_FRACTION, TEST_FRACTION) != split:
            continue
        try:
            text = (base / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield Document(id=rel, text=text, domain="code")
