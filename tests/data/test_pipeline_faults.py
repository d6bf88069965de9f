"""The rephrasing pipeline against a real local endpoint that misbehaves: retries, failures by
kind, a server that dies mid-run, and a rerun that completes the rest exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter

from k2_data.pipeline import read_outputs
from k2_data.rephrase import RephraseConfig, run_rephrase
from synth_fake_llm import FakeEndpoint


def write_docs(path, n):
    import json

    with open(path, "w") as f:
        for i in range(n):
            text = (
                f"Item {i} was found in the north archive. It weighs {i + 3} kilograms. "
                f"Its keeper is called Warden{i}."
            )
            if i == 4:
                text += " This one is UNFAITHFUL."
            f.write(json.dumps({"id": f"d{i:02d}", "text": text}) + "\n")


def config(tmp_path, base_url, n=12, **pipe):
    docs = tmp_path / "docs.jsonl"
    if not docs.exists():
        write_docs(docs, n)
    return RephraseConfig.model_validate(
        {
            "source": {"uri": str(docs), "domain": "notes"},
            "n_rephrasings": 2,
            "generator": {
                "options": {
                    "base_url": base_url,
                    "model": "fake-llm",
                    "backoff": 0.01,
                    "backoff_max": 0.05,
                    "max_retries": 2,
                    "timeout_s": 0.5,
                }
            },
            "pipeline": {
                "out": str(tmp_path / "out"),
                "shard_size": 4,
                "concurrency": 4,
                "tracking": False,
                "progress": False,
                **pipe,
            },
        }
    )


def check_exactly_once(out, n_docs, n_per_doc, rejected):
    ids = Counter(r["id"] for r in read_outputs(out))
    assert max(ids.values()) == 1
    assert len(ids) == n_docs * n_per_doc - rejected
    return ids


def test_transient_faults_are_retried_to_completion(tmp_path):
    ep = FakeEndpoint()
    ep.llm.flaky, ep.llm.hang_s = ("500", "429", "garbage", "nochoices", "timeout"), 1.0
    try:
        s = run_rephrase(config(tmp_path, ep.base_url))
    finally:
        ep.stop()
    assert s.complete and s.failed == {}
    assert s.rejected == {"unfaithful": 2}  # d04 in both of its styles
    assert s.usage["retries"] >= 5 and s.usage["requests"] == 24 + s.usage["retries"]
    recs = read_outputs(str(tmp_path / "out"))
    check_exactly_once(str(tmp_path / "out"), 12, 2, 2)
    r = next(x for x in recs if x["source_id"] == "d01")
    assert r["text"].startswith("Its keeper is called Warden1.") and r["fidelity"]["lexical"] > 0.9


def test_persistent_500s_fail_by_kind_then_rerun_completes(tmp_path):
    ep = FakeEndpoint()
    ep.llm.always_fail_marker = "Warden7."
    try:
        s = run_rephrase(config(tmp_path, ep.base_url))
        assert not s.complete and s.failed == {"server_error": 2}
        ep.llm.always_fail_marker = None
        s2 = run_rephrase(config(tmp_path, ep.base_url))
    finally:
        ep.stop()
    assert s2.complete and s2.items_this_run == 2
    ids = check_exactly_once(str(tmp_path / "out"), 12, 2, 2)
    assert sum(i.startswith("d07::") for i in ids) == 2


def test_server_dies_mid_run_then_rerun_on_new_server(tmp_path):
    ep = FakeEndpoint(latency_s=0.02)
    stopper = threading.Thread(target=lambda: (_wait_requests(ep, 8), ep.stop()))
    stopper.start()
    s = run_rephrase(config(tmp_path, ep.base_url, n=20))
    stopper.join()
    assert not s.complete and set(s.failed) <= {"connection", "timeout"}
    assert s.failed.get("connection", 0) > 0
    ep2 = FakeEndpoint()  # another port: base_url is not part of the run's identity
    try:
        s2 = run_rephrase(config(tmp_path, ep2.base_url, n=20))
    finally:
        ep2.stop()
    assert s2.complete and s2.items_this_run == sum(s.failed.values())
    check_exactly_once(str(tmp_path / "out"), 20, 2, 2)


def _wait_requests(ep, n):
    while ep.llm.requests < n:
        time.sleep(0.005)
