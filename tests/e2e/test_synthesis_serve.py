"""End to end over real HTTP: `k2 serve` of a tiny k2 checkpoint, then `k2 rephrase` and
`k2 synth-tools` (as subprocesses, the way a user runs them) against it.

The tiny model is trained on two chat answers only, so its rewrites are not faithful and it
cannot write JSON: rephrasing runs with the similarity check off, and synth-tools lets the
deterministic designer/user/tool/judge endpoint of the data tests play those roles while the
k2 model is the agent. What is under test is the plumbing: real requests to a real k2 server,
completed runs, committed records, counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from serve_fixture import make_checkpoint, start_server, stop_server  # noqa: E402
from synth_fake_llm import FakeEndpoint  # noqa: E402

K2 = str(Path(sys.executable).parent / "k2")
pytestmark = pytest.mark.slow  # trains a tiny chat model, starts `k2 serve`


@pytest.fixture(scope="module")
def k2_server(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("synth-serve") / "tiny-chat")
    make_checkpoint(ckpt)
    proc, base = start_server(ckpt, "--max-tokens", "32", timeout_s=180)
    yield f"{base}/v1"
    stop_server(proc)


def _run(tmp_path, cmd: str, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"{cmd}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([K2, cmd, str(path)], capture_output=True, text=True, timeout=600)


def test_rephrase_against_k2_serve(tmp_path, k2_server):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "text": f"Say hello. Town {i} is old."}) + "\n"
            for i in range(3)
        )
    )
    gen = {
        "options": {
            "base_url": k2_server,
            "max_tokens": 16,
            "allow_truncated": True,
            "max_concurrency": 4,
        }
    }
    r = _run(
        tmp_path,
        "rephrase",
        {
            "source": {"uri": str(docs)},
            "n_rephrasings": 2,
            "generator": gen,
            "sampling": {"max_tokens": 16},
            "fidelity": {"method": "none"},
            "pipeline": {"out": str(tmp_path / "reph"), "shard_size": 2, "tracking": False},
        },
    )
    assert r.returncode == 0, r.stdout + r.stderr
    done = json.loads((tmp_path / "reph" / "done.json").read_text())
    assert done["n_items"] == 6 and done["records"] + sum(done["rejected"].values()) == 6
    assert set(done["rejected"]) <= {"empty_rewrite"}
    recs = [
        json.loads(x)
        for p in sorted((tmp_path / "reph" / "data").glob("*.jsonl"))
        for x in p.read_text().splitlines()
    ]
    assert len(recs) == done["records"] and done["usage"]["completion_tokens"] > 0
    assert all(r["generator"]["model"] and r["generator"]["name"] == "openai" for r in recs)


def test_synth_tools_with_k2_serve_as_the_agent(tmp_path, k2_server):
    fake = FakeEndpoint()
    try:
        helper = {"options": {"base_url": fake.base_url, "model": "fake-llm"}}
        r = _run(
            tmp_path,
            "synth-tools",
            {
                "seed_domains": ["weather"],
                "n_subdomains": 1,
                "tasks_per_agent": 1,
                "max_turns": 2,
                "max_tools_per_agent": 1,
                "sampling": {"max_tokens": 32},
                "generator": {
                    "options": {"base_url": k2_server, "max_tokens": 32, "allow_truncated": True}
                },
                "designer_generator": helper,
                "user_generator": helper,
                "tool_generator": helper,
                "judge_generator": helper,
                "pipeline": {"out": str(tmp_path / "tools"), "tracking": False},
            },
        )
        # The agent's turns went to k2 serve: the simulated user saw its replies.
        assert fake.llm.requests > 0
    finally:
        fake.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    done = json.loads((tmp_path / "tools" / "trajectories" / "done.json").read_text())
    assert done["n_items"] == 1 and done["records"] + sum(done["rejected"].values()) == 1
    assert "SFT dataset:" in r.stdout
