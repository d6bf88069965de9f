"""Sources: every format over local and memory:// URIs, globs, bad-input accounting."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from k2_core.errors import ConfigError
from k2_data.config import SourceConfig, load_prepare_config
from k2_data.sources import expand, iter_documents, read_source
from k2data_testutil import make_texts


def _jsonl_bytes(texts, field="text"):
    return "".join(
        json.dumps({"id": f"i{i}", field: t}) + "\n" for i, t in enumerate(texts)
    ).encode()


def _read(uri, **kw):
    skipped: Counter = Counter()
    docs = list(read_source(SourceConfig(uri=uri, domain="x", **kw), 0, skipped))
    return docs, skipped


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_formats_local_and_memory(tmp_path, ext):
    texts = make_texts(20, 5)
    raw = _jsonl_bytes(texts)
    if ext == "jsonl.gz":
        raw = gzip.compress(raw)
    elif ext == "jsonl.zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    elif ext == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"i{i}" for i in range(20)], "text": texts}), buf)
        raw = buf.getvalue().to_pybytes()
    for uri in (
        str(tmp_path / f"f.{ext}"),
        f"file://{tmp_path}/g.{ext}",
        f"memory://k2src/{ext}/f.{ext}",
    ):
        with fsspec.open(uri, "wb") as f:
            f.write(raw)
        docs, skipped = _read(uri)
        assert [d.text for d in docs] == texts and not skipped
        assert docs[0].id == "i0" and docs[0].domain == "x"


def test_text_files_and_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\nsecond line")
    (tmp_path / "skip.md").write_text("not matched")
    docs, _ = _read(str(tmp_path / "doc*.txt"))
    assert [d.text.split("\n")[0] for d in docs] == [f"document number {i}" for i in range(3)]
    assert docs[0].id.endswith("doc0.txt")
    assert len(expand(SourceConfig(uri=str(tmp_path)))) == 4  # a folder: every file in it


def test_bad_input_is_counted_and_skipped(tmp_path):
    good = make_texts(5, 9, hi=30)
    lines = [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(good)]
    lines += [
        b"{not json",
        b'{"id": 1, "body": "missing text field"}',
        b'{"id": 2, "text": 42}',
        b'{"id": 3, "text": "caf\xe9 latin-1"}',  # invalid UTF-8
        json.dumps({"id": 4, "text": "   "}).encode(),
        json.dumps({"id": 5, "text": "x" * 500}).encode(),
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nonsense")
    (tmp_path / "latin.txt").write_bytes(b"\xff\xfe bad")
    cfg = load_prepare_config({"sources": [{"uri": str(tmp_path / "*")}], "max_chars": 400})
    skipped: Counter = Counter()
    docs = list(iter_documents(cfg, skipped))
    assert [d.text for d in docs] == good
    assert dict(skipped) == {
        "invalid_json": 1,
        "missing_field": 1,
        "not_text": 1,
        "invalid_utf8": 2,
        "empty": 1,
        "too_long": 1,
        "unreadable": 3,
    }


def test_missing_source_is_a_config_error(tmp_path):
    cfg = load_prepare_config({"sources": [{"uri": str(tmp_path / "nothing-*.jsonl")}]})
    with pytest.raises(ConfigError, match="no file matches"):
        list(iter_documents(cfg, Counter()))


def test_round_robin_mixes_domains(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes(["a1", "a2", "a3"]))
    (tmp_path / "b.jsonl").write_bytes(_jsonl_bytes(["b1"]))
    cfg = load_prepare_config(
        {
            "sources": [
                {"uri": str(tmp_path / "a.jsonl"), "domain": "A"},
                {"uri": str(tmp_path / "b.jsonl"), "domain": "B"},
                {"uri": str(tmp_path / "b.jsonl"), "domain": "C"},
            ],
            "weights": {"C": 0},
        }
    )
    assert [d.text for d in iter_documents(cfg, Counter())] == ["a1", "b1", "a2", "a3"]


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="seq_len: must be > 0"):
        load_prepare_config({}, ["seq_len=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_prepare_config({"sourcez": []})
    p = tmp_path / "c.yaml"
    p.write_text("seq_len: 64\nsources:\n  - uri: /x/*.jsonl\n    domain: web\n")
    cfg = load_prepare_config(str(p), ["val_fraction=0.1"])
    assert cfg.seq_len == 64 and cfg.val_fraction == 0.1 and cfg.sources[0].domain == "web"
    with pytest.raises(ConfigError, match="no such file"):
        load_prepare_config(str(tmp_path / "nope.yaml"))
