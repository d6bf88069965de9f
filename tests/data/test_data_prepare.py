"""`k2 data prepare`: layout, determinism, dedup, mixture, splits, resume after SIGKILL, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from k2_core.errors import ConfigError
from k2_data.config import DataPrepareConfig, output_uri
from k2_data.prepare import copies, inspect_dataset, prepare, read_manifest
from k2_data.tokenizer import load_tokenizer
from k2data_testutil import make_texts, small_cfg, write_jsonl


def tree_hash(root: str) -> dict[str, str]:
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_layout_manifest_and_loader_contract(jsonl_corpus, tmp_path):
    uri = prepare(small_cfg([{"uri": jsonl_corpus, "domain": "web"}], str(tmp_path / "ds")))
    m = read_manifest(uri)
    assert m["format"] == "k2-packed" and m["version"] == 2 and m["complete"] is True
    assert m["seq_len"] == 32 and m["tokenizer"]["name"] == "bpe"
    tok = load_tokenizer(f"{uri}/tokenizer")
    assert tok.content_hash == m["tokenizer"]["content_hash"] and tok.eos_id == m["eos_id"]
    root = zarr.open_group(uri, mode="r")
    for split in ("train", "val"):
        t, ds = root[split]["tokens"], root[split]["doc_starts"]
        assert t.dtype == np.uint32 and t.shape[1] == 33 and ds.dtype == np.int64
        assert t.chunks[1] == 33  # whole rows per chunk
        arr, starts = t[...], ds[...]
        s = m["splits"][split]
        assert t.shape[0] == s["n_sequences"] > 0 and arr.size == s["n_tokens"]
        assert len(starts) == s["n_documents"] and starts[0] == 0
        flat = arr.reshape(-1)
        assert np.all(flat[starts[1:] - 1] == tok.eos_id)  # every document follows an EOS
        assert zlib.crc32(arr.tobytes()) == m["checksums"][f"{split}/tokens"]
        assert zlib.crc32(starts.tobytes()) == m["checksums"][f"{split}/doc_starts"]
        row_docs = root[split]["row_docs"][...]  # row r's documents, for the loader's range reads
        assert np.array_equal(row_docs, np.searchsorted(starts, np.arange(len(arr) + 1) * 33))
        assert zlib.crc32(row_docs.tobytes()) == m["checksums"][f"{split}/row_docs"]
        assert arr.max() < m["vocab_size"]
    assert not (tmp_path / "ds" / "_work").exists()
    assert m["documents"]["train"] + m["documents"]["val"] == m["documents"]["unique"] == 300
    assert m["tokens_per_domain"]["web"] > 0 and m["duplicates"] == 0
    text = inspect_dataset(uri, 2)
    assert len(text) == 2 and text[0].startswith("\u2016doc ")


def test_deterministic_bytes_any_worker_count(jsonl_corpus, tmp_path):
    src = [{"uri": jsonl_corpus, "domain": "web"}]
    a = prepare(small_cfg(src, str(tmp_path / "a"), workers=0))
    b = prepare(small_cfg(src, str(tmp_path / "b"), workers=2, batch_docs=16))
    ha, hb = tree_hash(a), tree_hash(b)
    assert ha == hb and "train/tokens/c/0/0" in ha


def test_dedup_weights_and_memory_output(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    texts = make_texts(60, 4)
    write_jsonl(d / "a.jsonl", texts + texts[:10])  # 10 exact duplicates
    write_jsonl(d / "b.jsonl", make_texts(60, 5))
    write_jsonl(d / "c.jsonl", make_texts(60, 6))
    src = [
        {"uri": str(d / "a.jsonl"), "domain": "A"},
        {"uri": str(d / "b.jsonl"), "domain": "B"},
        {"uri": str(d / "c.jsonl"), "domain": "C"},
    ]
    one = read_manifest(prepare(small_cfg(src, "memory://k2-prep/one", val_fraction=0)))
    assert one["duplicates"] == 10 and one["documents"]["unique"] == 180
    assert one["splits"]["val"]["n_sequences"] == 0
    mix = read_manifest(
        prepare(
            small_cfg(
                src, "memory://k2-prep/mix", val_fraction=0, weights={"A": 3, "B": 0.5, "C": 0}
            )
        )
    )
    t1, t2 = (
        one["splits"]["train"]["tokens_per_domain"],
        mix["splits"]["train"]["tokens_per_domain"],
    )
    assert t2["A"] == 3 * t1["A"] and "C" not in t2
    assert 0.25 * t1["B"] < t2["B"] < 0.75 * t1["B"]
    assert mix["weights"] == {"A": 3.0, "B": 0.5, "C": 0.0}
    # the fractional draw is a pure function of (document, weight, seed)
    dg = hashlib.sha256(b"x").digest()[:16]
    assert copies(dg, 2.0, 0) == 2 and copies(dg, 0.0, 0) == 0
    assert copies(dg, 1.5, 7) == copies(dg, 1.5, 7) in (1, 2)


def test_older_layout_of_the_same_config_is_rebuilt(jsonl_corpus, tmp_path):
    """A dataset prepared before the current layout (the cached built-in corpus, say) is rebuilt."""
    cfg = small_cfg([{"uri": jsonl_corpus, "domain": "web"}], str(tmp_path / "ds"))
    uri = prepare(cfg)
    want = tree_hash(uri)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    assert prepare(cfg) == uri and tree_hash(uri) == want


def test_tiny_corpus_still_gets_validation(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", make_texts(12, 8))
    m = read_manifest(
        prepare(small_cfg([{"uri": str(tmp_path / "t.jsonl")}], str(tmp_path / "o"), seq_len=16))
    )
    assert m["splits"]["val"]["n_sequences"] >= 1 and m["splits"]["train"]["n_sequences"] >= 1


def test_empty_or_missing_is_a_config_error(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": "   "}\n{"nope": 1}\n')
    with pytest.raises(ConfigError, match="empty result"):
        prepare(small_cfg([{"uri": str(tmp_path / "e.jsonl")}], str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="no file matches"):
        prepare(small_cfg([{"uri": str(tmp_path / "none*.jsonl")}], str(tmp_path / "o2")))
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "precious.txt").write_text("keep")
    write_jsonl(tmp_path / "f.jsonl", make_texts(40, 1))
    with pytest.raises(ConfigError, match="not a k2 dataset"):
        prepare(small_cfg([{"uri": str(tmp_path / "f.jsonl")}], str(tmp_path / "o3")))


# `k2 data ...` in a process whose shard commits are slowed by `delay` seconds each (so a test
# can kill it, or race others, mid-run): the delay is injected here, not in k2_data
_SLOW_CLI = """
import sys, time
import k2_data.prepare as prepare
delay, real = float(sys.argv[1]), prepare._write_json
def slow(fs, path, obj, **kw):
    real(fs, path, obj, **kw)
    if "/_work/shard-" in path and path.endswith(".json"):
        time.sleep(delay)
prepare._write_json = slow
from k2_core.cli import main
sys.exit(main(["data", *sys.argv[2:]]))
"""


def _cli(args, env=None, delay=None, **kw):
    cmd = (
        [sys.executable, "-c", _SLOW_CLI, str(delay)]
        if delay
        else [sys.executable, "-m", "k2_core.cli", "data"]
    )
    return subprocess.Popen(
        [*cmd, *args],
        env={**os.environ, "K2_LOAD_PLUGINS": "data", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _corpus_and_reference(tmp_path, n: int, seed: int) -> tuple[Path, str]:
    """A JSONL corpus, its `k2 data prepare` YAML, and a reference build made in-process."""
    d = tmp_path / "src"
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_texts(n, seed))
    cfg_path = tmp_path / "prep.yaml"
    cfg_path.write_text(
        f"sources:\n  - uri: {d}/*.jsonl\n    domain: web\n"
        "tokenizer: {name: bpe, options: {vocab_size: 400}}\n"
        "seq_len: 32\nshard_docs: 50\nworkers: 0\n"
    )
    ref = prepare(
        small_cfg([{"uri": f"{d}/*.jsonl", "domain": "web"}], str(tmp_path / "ref"), shard_docs=50)
    )
    return cfg_path, ref


def test_concurrent_prepares_of_one_output_build_it_once(tmp_path):
    """Several ranks of one job finding the dataset missing: one builds, the others wait for it."""
    cfg_path, ref = _corpus_and_reference(tmp_path, 300, 5)
    out = tmp_path / "shared"
    procs = [_cli(["prepare", str(cfg_path), "--out", str(out)], delay=0.3) for _ in range(3)]
    said = []
    for p in procs:
        stdout, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        said.append(stdout.splitlines()[0])
    assert sum("(reused)" not in line for line in said) == 1, said  # exactly one built it
    assert tree_hash(str(out)) == tree_hash(ref)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    cfg_path, ref = _corpus_and_reference(tmp_path, 400, 11)
    out = tmp_path / "killed"
    proc = _cli(["prepare", str(cfg_path), "--out", str(out)], delay=0.4)
    deadline = time.time() + 60
    while not (out / "_work" / "shard-000001.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / "_work").glob("shard-*.json"))
    assert 2 <= len(done) < 8  # interrupted mid-run, with committed shards to reuse
    again = _cli(["prepare", str(cfg_path), "--out", str(out)])
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert "dataset ready" in stdout
    assert tree_hash(str(out)) == tree_hash(ref)
    reuse = _cli(["prepare", str(cfg_path), "--out", str(out)])
    assert "reused" in reuse.communicate(timeout=60)[0]


def test_cli_stats_inspect_and_errors(jsonl_corpus, tmp_path, capsys):
    from k2_core.cli import main

    out = str(tmp_path / "ds")
    prepare(small_cfg([{"uri": jsonl_corpus, "domain": "web"}], out))
    assert main(["data", "stats", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["n_sequences"] > 0 and info["skipped"] == {}
    assert main(["data", "stats", out]) == 0
    assert "domain web" in capsys.readouterr().out
    assert main(["data", "inspect", out, "--n", "2"]) == 0
    assert capsys.readouterr().out.count("--- train[") == 2
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    assert "not a complete k2 packed dataset" in capsys.readouterr().err
    assert main(["data", "prepare", "--out", str(tmp_path / "x"), "seq_len=0"]) == 2
    assert "seq_len: must be > 0" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"sources: [{{uri: '{jsonl_corpus}'}}]\ntokenizer: {{options: {{vocab_size: 400}}}}\n"
    )
    assert main(["data", "tokenizer", "train", str(cfg), "--out", str(tmp_path / "tk")]) == 0
    assert load_tokenizer(str(tmp_path / "tk")).vocab_size <= 400


def test_builtin_corpus_and_default_dataset(tmp_path, monkeypatch):
    pytest.importorskip("k2_data.corpus")
    import k2_data.prepare as prep

    default = DataPrepareConfig()
    assert [(s.kind, s.domain) for s in default.sources] == [
        ("builtin", "code"),
        ("builtin", "math"),
        ("builtin", "knowledge"),
    ]
    assert default.tokenizer.options == {"vocab_size": 8192} and default.seq_len == 256
    monkeypatch.setenv("K2_CACHE_DIR", str(tmp_path / "cache"))
    assert output_uri(default) == str(
        tmp_path / "cache" / "data" / f"builtin-{default.config_hash()}"
    )
    small = DataPrepareConfig.model_validate(
        {
            "sources": [
                {"kind": "builtin", "domain": d, "scale": 0.02}
                for d in ("code", "math", "knowledge")
            ],
            "tokenizer": {"options": {"vocab_size": 512}},
            "workers": 0,
            "seq_len": 64,
        }
    )
    monkeypatch.setattr(prep, "DataPrepareConfig", lambda: small)
    uri = prep.default_dataset_uri()
    assert uri.startswith(str(tmp_path / "cache" / "data" / "builtin-"))
    m = read_manifest(uri)
    assert set(m["tokens_per_domain"]) == {"code", "math", "knowledge"}
    t0 = time.perf_counter()
    assert prep.default_dataset_uri() == uri and time.perf_counter() - t0 < 1.0  # reused


# -- skipped input and failed runs (issue 15) --------------------------------------------------


def _corpus_with_bad_input(d: Path) -> str:
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_texts(120, 3))
    (d / "b.jsonl").write_text(
        '{"text": "fine text here"}\n{not json\n{"body": "x"}\n{"text": 7}\n{"text": "   "}\n'
    )
    (d / "c.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip at all")
    return str(d / "*")


def test_skipped_input_is_logged_and_shown_by_stats(tmp_path, capsys):
    """Each skipped file or record is in OUT/skipped.jsonl with its reason; `k2 data stats`
    shows the count, the reasons and the first files/records; OUT.lock is gone."""
    from k2_core.cli import main

    out = tmp_path / "ds"
    uri = prepare(small_cfg([{"uri": _corpus_with_bad_input(tmp_path / "src")}], str(out)))
    m = read_manifest(uri)
    assert m["skipped"] == {
        "empty": 1,
        "invalid_json": 1,
        "missing_field": 1,
        "not_text": 1,
        "unreadable": 1,
    }
    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    by_reason = {e["reason"]: e for e in log}
    assert len(log) == 5 and m["skip_log"] == {
        "path": "skipped.jsonl",
        "entries": 5,
        "not_logged": 0,
    }
    assert by_reason["invalid_json"]["file"].endswith("b.jsonl")
    assert by_reason["invalid_json"]["record"] == "line 2"
    assert by_reason["missing_field"]["record"] == "line 3"
    assert by_reason["not_text"]["record"] == "line 4"
    assert by_reason["empty"]["file"].endswith("b.jsonl")
    assert by_reason["unreadable"]["file"].endswith("c.jsonl.gz")
    assert "record" not in by_reason["unreadable"] and by_reason["unreadable"]["detail"]
    assert not (tmp_path / "ds.lock").exists()

    assert main(["data", "stats", uri]) == 0
    text = capsys.readouterr().out
    assert "skipped 5" in text and "c.jsonl.gz" in text and "b.jsonl line 2" in text
    assert "skipped.jsonl" in text
    assert main(["data", "stats", uri, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["skipped_total"] == 5 and len(info["skip_log"]) == 5


def _leftovers(tmp_path: Path, name: str) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob(f"{name}*"))


def test_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """Bad input (no usable document: every file corrupt or empty): exit 2, one line, and no
    OUT/_work, OUT/tokenizer or OUT.lock; a folder the user made is kept, emptied of ours
    only. A failure before any shard is committed (injected) leaves nothing either."""
    from k2_core.cli import main

    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 garbage")
    (src / "y.jsonl").write_text('{"text": ""}\n{oops\n')
    assert (
        main(
            [
                "data",
                "prepare",
                "--out",
                str(tmp_path / "o1"),
                f"sources=[{{uri: '{src}'}}]",
                "tokenizer.options.vocab_size=400",
                "workers=0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "empty result" in err and len(err.strip().splitlines()) == 1, err
    assert _leftovers(tmp_path, "o1") == []

    (tmp_path / "o2").mkdir()  # the user's (empty) folder: kept, nothing of ours left in it
    with pytest.raises(ConfigError, match="empty result"):
        prepare(small_cfg([{"uri": str(src)}], str(tmp_path / "o2")))
    assert _leftovers(tmp_path, "o2") == ["o2"] and not any((tmp_path / "o2").iterdir())

    import k2_data.prepare as prep

    def boom(self, texts):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(prep._Encoder, "submit", boom)
    write_jsonl(tmp_path / "good.jsonl", make_texts(100, 4))
    with pytest.raises(RuntimeError, match="injected"):
        prepare(small_cfg([{"uri": str(tmp_path / "good.jsonl")}], str(tmp_path / "o3")))
    assert _leftovers(tmp_path, "o3") == []


def test_interrupted_prepare_keeps_only_what_resume_needs(tmp_path, monkeypatch, capsys):
    """Ctrl-C after shards were committed: _work/ and tokenizer/ stay (a rerun resumes and
    builds the same bytes as an uninterrupted run), the partial arrays and OUT.lock go.
    Bad input at the same point leaves nothing."""
    import k2_data.prepare as prep

    write_jsonl(tmp_path / "good.jsonl", make_texts(200, 6))
    sources = [{"uri": str(tmp_path / "good.jsonl")}]
    ref = prepare(small_cfg(sources, str(tmp_path / "ref"), shard_docs=50))
    real = prep._assemble

    def interrupted(cfg, tok, out, fs, root_path, n_shards):
        import zarr

        zarr.open_group(out, mode="a").require_group("train")  # a partial array, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_assemble", interrupted)
    out = tmp_path / "ds"
    from k2_core.cli import main

    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        f"sources: [{{uri: '{sources[0]['uri']}'}}]\nseq_len: 32\nshard_docs: 50\n"
        "workers: 0\ntokenizer: {name: bpe, options: {vocab_size: 400}}\n"
    )
    assert main(["data", "prepare", str(cfg), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "interrupted" in err[0] and "rerun the same command to resume" in err[0]
    )
    assert sorted(p.name for p in out.iterdir()) == ["_work", "tokenizer"]
    assert len(list((out / "_work").glob("shard-*.json"))) == 4
    assert not (tmp_path / "ds.lock").exists()
    monkeypatch.setattr(prep, "_assemble", real)
    resumed = small_cfg(sources, str(out), shard_docs=50)
    plan = json.loads((out / "_work" / "plan.json").read_text())
    assert plan["config_hash"] == resumed.config_hash()  # the rerun resumes, not starts over
    assert tree_hash(prepare(resumed)) == tree_hash(ref)

    def bad_input(*args):
        raise ConfigError("injected bad input")

    monkeypatch.setattr(prep, "_assemble", bad_input)
    with pytest.raises(ConfigError, match="injected bad input"):
        prepare(small_cfg(sources, str(tmp_path / "ds2"), shard_docs=50))
    assert _leftovers(tmp_path, "ds2") == []
