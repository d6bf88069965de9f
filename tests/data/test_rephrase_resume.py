"""SIGKILL a real `k2 rephrase` mid-run; the rerun neither loses nor duplicates records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from k2_data.pipeline import ShardStore, read_outputs
from synth_fake_llm import FakeEndpoint

K2 = str(Path(sys.executable).parent / "k2")


@pytest.mark.slow  # two `k2` processes: ~10 s on an idle box, 40 s on a loaded one
def test_sigkill_then_rerun_is_exactly_once(tmp_path):
    n_docs, n_per = 24, 3
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(n_docs):
            extra = " This is UNFAITHFUL." if i % 8 == 5 else ""
            f.write(
                json.dumps(
                    {
                        "id": f"k{i:02d}",
                        "text": f"Fact {i} is true. Fact {i} is old. Fact {i} is useful.{extra}",
                    }
                )
                + "\n"
            )
    out = tmp_path / "out"
    ep = FakeEndpoint(latency_s=0.05)  # slow enough to kill it half-way
    cfg = {
        "source": {"uri": str(docs), "domain": "facts"},
        "n_rephrasings": n_per,
        "generator": {"options": {"base_url": ep.base_url, "model": "fake-llm"}},
        "pipeline": {"out": str(out), "shard_size": 4, "concurrency": 2, "tracking": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    try:
        proc = subprocess.Popen(
            [K2, "rephrase", str(tmp_path / "cfg.yaml")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(ShardStore(str(out)).committed()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ShardStore(str(out))
        committed = store.committed()
        assert 3 <= len(committed) < 18  # killed part-way
        for m in (x for ms in committed.values() for x in ms):  # visible = whole
            assert len((out / m["file"]).read_text().splitlines()) == m["n_records"]
        before = len(read_outputs(str(out)))
        rerun = subprocess.run(
            [K2, "rephrase", str(tmp_path / "cfg.yaml"), "pipeline.concurrency=8"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        ep.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert "complete" in rerun.stdout
    recs = read_outputs(str(out))
    ids = Counter(r["id"] for r in recs)
    rejected = n_per * sum(1 for i in range(n_docs) if i % 8 == 5)
    assert max(ids.values()) == 1 and before < len(recs) == n_docs * n_per - rejected
    done = json.loads((out / "done.json").read_text())
    assert done["rejected"] == {"unfaithful": rejected} and done["records"] == len(recs)
