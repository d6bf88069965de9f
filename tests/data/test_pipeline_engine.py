"""The pipeline engine: exactly-once commits, resume, counts, formats, fsspec, mlflow."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from k2_core.errors import ConfigError, K2Error
from k2_data.pipeline import ItemResult, PipelineOptions, ShardStore, read_outputs, run_pipeline


class Injected(Exception):
    error_kind = "server_error"


class Abort(K2Error):
    kind = "test"


class UpperStage:
    """A stage with no model: upper-cases text, rejects `bad`, fails or aborts on demand."""

    name = "upper"

    def __init__(self, n: int, fail_ids: set[str] = frozenset(), abort_after: int | None = None):
        self.n, self.fail_ids, self.abort_after = n, fail_ids, abort_after
        self.calls = 0

    def identity(self):
        return {"n": self.n}

    def items(self):
        for i in range(self.n):
            yield {"id": f"doc-{i:03d}", "text": f"text {i}" + (" bad" if i % 7 == 3 else "")}

    def make_processor(self):
        return UpperProc(self)


class UpperProc:
    def __init__(self, stage: UpperStage):
        self.stage = stage

    async def __call__(self, item):
        st = self.stage
        await asyncio.sleep(0.001)
        st.calls += 1
        if st.abort_after is not None and st.calls > st.abort_after:
            raise Abort("stop here")
        if item["id"] in st.fail_ids:
            raise Injected("injected")
        if "bad" in item["text"]:
            return ItemResult(rejected="bad_word")
        return ItemResult(records=[{"text": item["text"].upper()}])

    def stats(self):
        return {"requests": self.stage.calls}

    async def aclose(self):
        pass


def opts(out, **kw):
    base = {
        "out": str(out),
        "shard_size": 8,
        "concurrency": 4,
        "tracking": False,
        "progress": False,
    }
    return PipelineOptions(**{**base, **kw})


def expected_ids(n):
    return {f"doc-{i:03d}" for i in range(n) if i % 7 != 3}


def test_counts_failures_and_rerun_completes_exactly_once(tmp_path):
    out = tmp_path / "run"
    fails = {"doc-001", "doc-011", "doc-033"}
    s = run_pipeline(UpperStage(40, fails), opts(out))
    n_rej = sum(1 for i in range(40) if i % 7 == 3)
    assert not s.complete
    assert s.rejected == {"bad_word": n_rej} and s.failed == {"server_error": 3}
    assert s.records == 40 - n_rej - 3 and s.n_items == 40
    assert not (out / "done.json").exists()
    stage = UpperStage(40)
    s2 = run_pipeline(stage, opts(out))
    assert s2.complete and s2.failed == {} and s2.items_this_run == 3 and stage.calls == 3
    recs = read_outputs(str(out))
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(40)
    assert all(r["text"] == r["text"].upper() for r in recs)
    # the retried items went into second attempts of their shards
    assert sorted(p.name for p in (out / "data").glob("*-a01.jsonl")) == [
        "part-00000-a01.jsonl",
        "part-00001-a01.jsonl",
        "part-00004-a01.jsonl",
    ]
    done = json.loads((out / "done.json").read_text())
    assert done["records"] == len(ids)
    s3 = run_pipeline(UpperStage(40), opts(out))  # nothing left: no work, same totals
    assert s3.items_this_run == 0 and s3.records == len(ids)


def test_abort_leaves_only_whole_shards_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Abort):
        run_pipeline(UpperStage(64, abort_after=30), opts(out))
    store = ShardStore(str(out))
    committed = store.committed()
    assert 0 < len(committed) < 8
    for path in (out / "data").iterdir():  # every visible file is a whole committed shard
        shard = int(path.name[5:10])
        lines = path.read_text().splitlines()
        assert len(lines) == committed[shard][0]["n_records"]
    stage = UpperStage(64)
    s = run_pipeline(stage, opts(out))
    assert s.complete and stage.calls == 64 - sum(len(m[0]["done_ids"]) for m in committed.values())
    ids = [r["id"] for r in read_outputs(str(out))]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(64)


def test_uncommitted_attempt_is_invisible_and_redone(tmp_path):
    out = tmp_path / "run"
    run_pipeline(UpperStage(16, {"doc-002"}), opts(out))
    # A kill between the manifest and the rename: the manifest is there, the data is not.
    (out / "_manifests" / "shard-00000-a01.json").write_text('{"partial": ')
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-00000-a01.jsonl.tmp").write_text('{"id": "doc-002", "te')
    s = run_pipeline(UpperStage(16), opts(out))
    assert s.complete and not list((out / "_tmp").iterdir())
    ids = Counter(r["id"] for r in read_outputs(str(out)))
    assert ids["doc-002"] == 1 and set(ids) == expected_ids(16)


def test_memory_fs_and_parquet_readable_by_data_sources():
    from k2_data.config import SourceConfig
    from k2_data.sources import read_source

    out = "memory://k2-test-pipeline/run"
    s = run_pipeline(UpperStage(20), opts(out, format="parquet"))
    assert s.complete
    skipped: Counter = Counter()
    src = SourceConfig(uri=f"{out}/data/*.parquet", domain="upper")
    docs = list(read_source(src, 0, skipped))
    assert {d.id for d in docs} == expected_ids(20) and not skipped
    assert all(d.text.startswith("TEXT") for d in docs)


def test_other_config_or_format_in_out_is_refused(tmp_path):
    run_pipeline(UpperStage(5), opts(tmp_path))
    with pytest.raises(ConfigError, match="another config"):
        run_pipeline(UpperStage(6), opts(tmp_path))
    with pytest.raises(ConfigError, match="format"):
        run_pipeline(UpperStage(5), opts(tmp_path, format="parquet"))


def test_duplicate_item_ids_are_refused(tmp_path):
    class Dup(UpperStage):
        def items(self):
            yield {"id": "a", "text": "x"}
            yield {"id": "a", "text": "y"}

    with pytest.raises(ConfigError, match="twice"):
        run_pipeline(Dup(2), opts(tmp_path))


@pytest.mark.slow  # mlflow's first sqlite store migrates its schema: ~15-40 s here
def test_mlflow_run_has_counts_and_sample(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    s = run_pipeline(UpperStage(20, {"doc-005"}), opts(out, tracking=True, experiment="t"))
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    m = run.data.metrics
    assert m["records"] == s.records and m["failed/server_error"] == 1
    assert m["rejected/bad_word"] == s.rejected["bad_word"] and m["complete"] == 0
    art = client.download_artifacts(run.info.run_id, "samples.json", str(tmp_path))
    sample = json.loads(open(art).read())["records"]
    assert sample and all(r["text"].startswith("TEXT") for r in sample)
