"""Fixtures of the k2-data tests."""

from __future__ import annotations

import pytest
from k2data_testutil import make_texts, write_jsonl


@pytest.fixture
def jsonl_corpus(tmp_path):
    """A folder with 2 JSON Lines files of 150 documents each; returns its glob."""
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_texts(150, 1), "a")
    write_jsonl(d / "b.jsonl", make_texts(150, 2), "b")
    return str(d / "*.jsonl")
