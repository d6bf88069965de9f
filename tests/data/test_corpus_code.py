"""The `code` domain: real standard-library files of the running interpreter."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from k2_data.corpus import builtin_documents, code_documents, stdlib_files, stdlib_root


def test_documents_are_stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_root() == root
    docs = list(builtin_documents("code", scale=0.1))
    assert docs
    for d in docs:
        path = root / d.id
        assert path.is_file() and path.suffix == ".py"
        assert path.read_text(encoding="utf-8") == d.text
        parts = Path(d.id).parts
        assert "site-packages" not in parts and "test" not in parts and "tests" not in parts
    assert [d.id for d in docs] == sorted(d.id for d in docs)


def test_most_files_parse_as_python():
    docs = list(builtin_documents("code", scale=0.1))
    ok = 0
    for d in docs:
        try:
            ast.parse(d.text)
            ok += 1
        except SyntaxError:
            pass
    assert ok >= 0.95 * len(docs)


def test_split_is_fixed_by_path_whatever_the_seed():
    val = {d.id for s in (0, 1, 2) for d in code_documents(split="val", seed=s, scale=10)}
    train = {d.id for s in (0, 1, 2) for d in code_documents(split="train", seed=s, scale=10)}
    assert val and not val & train
    everything = set(stdlib_files())
    assert val | train <= everything
    assert 0.005 < len(val) / len(everything) < 0.05


def test_seed_picks_another_subset_at_small_scale():
    a = {d.id for d in code_documents(seed=0, scale=0.2)}
    b = {d.id for d in code_documents(seed=1, scale=0.2)}
    assert a != b


def test_custom_root(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text("y = 2\n")
    ids = [d.id for s in ("train", "val", "test") for d in code_documents(split=s, root=tmp_path)]
    assert ids == ["pkg/mod.py"]
