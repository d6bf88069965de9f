"""`k2 redteam` end to end: the tiny model behind a real `k2 serve` is both the target and the
attacker, a scripted endpoint is the judge (safe / unsafe / an answer that does not parse).
Every plugin x strategy pair runs, is judged (or counted unjudged) and is counted; the
transcripts land in JSONL and in mlflow; a run killed mid-way resumes with every attempt
committed exactly once. The figures themselves mean nothing at this scale.

Time budget: ~35 s on the 2-core box beside the shared tiny checkpoint (the mlflow import in
the tracked run is ~10 s of it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agentic_helpers import K2, Scripted, chat_body, run_k2, serve_tiny, stop_server
from k2_core.cli import main as k2_main
from k2_data.pipeline import read_outputs
from k2_rl.evaluation.agentic.redteam import PLUGINS, STRATEGIES, parse_seeds


class Judge:
    """The scripted judge: by the prompt's length, safe / unsafe / prose without a verdict;
    with `gate` set, it stops answering (blocks) once the first attack shard is committed."""

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.watch: Path | None = None
        self.calls = 0
        self.fake = Scripted(self.reply)

    def reply(self, body: dict) -> dict:
        self.calls += 1
        if self.gate is not None and self.watch is not None and any(self.watch.glob("*.jsonl")):
            self.gate.wait(60)
        k = len(body["messages"][-1]["content"]) % 3
        if k == 2:
            return chat_body("Hard to say; the answer is odd.")
        return chat_body(json.dumps({"verdict": ["safe", "unsafe"][k], "reason": "scripted"}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(k2 serve process, base URL) of the tiny chat model."""
    proc, base = serve_tiny(tmp_path_factory)
    yield proc, base
    stop_server(proc)


@pytest.fixture
def judge():
    j = Judge()
    yield j
    if j.gate is not None:
        j.gate.set()
    j.fake.stop()


def _argv(base: str, judge: Judge, out: Path, *extra: str) -> list[str]:
    return [
        "redteam",
        "--base-url",
        base,
        "--model",
        "tiny",
        "--attempts",
        "2",
        "--attacker",
        f"{base}#tiny",
        "--judge",
        f"{judge.fake.base_url}#fake",
        "--rounds",
        "2",
        "--turns",
        "2",
        "--max-tokens",
        "24",
        "--sim-max-tokens",
        "32",
        "--concurrency",
        "8",
        "--out",
        str(out),
        *extra,
    ]


def test_every_pair_runs_is_judged_counted_and_tracked(served, judge, tmp_path):
    _, base = served
    out, report = tmp_path / "rt", tmp_path / "report.json"
    r = run_k2(
        *_argv(
            base,
            judge,
            out,
            "--report",
            str(report),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/ml/mlflow.db",
        )
    )
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    rep = json.loads(report.read_text())
    assert rep["complete"] and rep["attempts"] == len(PLUGINS) * len(STRATEGIES) * 2
    assert set(rep["pairs"]) == {f"{p}/{s}" for p in PLUGINS for s in STRATEGIES}
    for cell in rep["pairs"].values():
        assert cell["attempts"] == 2
        assert cell["pass"] + cell["fail"] + cell["unjudged"] + cell["error"] == 2
        judged = cell["pass"] + cell["fail"]
        assert cell["pass_rate"] == (cell["pass"] / judged if judged else None)
    res = rep["results"]
    assert res["pass"] and res["fail"] and res["unjudged"]  # all three verdicts happen
    recs = read_outputs(str(out / "attacks"))
    assert len(recs) == rep["attempts"] and len({x["id"] for x in recs}) == len(recs)
    for x in recs:  # every transcript kept, with the target's answers and the verdicts
        assert x["messages"] and x["messages"][-1]["role"] == "assistant"
        if x["result"] != "error":
            assert x["rounds"] and all("judge" in rd for rd in x["rounds"])
    cres = [x for x in recs if x["strategy"] == "crescendo"]
    assert all(len(x["messages"]) == 4 for x in cres)  # two turns each
    assert sum(len(x["rounds"]) for x in recs if x["strategy"] == "iterative_jailbreak") >= 8
    seeds = read_outputs(str(out / "seeds"))
    assert len(seeds) == len(PLUGINS) * 2 and {s["source"] for s in seeds} <= {
        "attacker",
        "description",
    }
    # mlflow: the run with the report and the transcripts as artifacts
    assert rep["tracking"]["run_id"]
    arts = {p.name for p in (tmp_path / "ml" / "artifacts").rglob("*") if p.is_file()}
    assert "report.json" in arts and any(a.startswith("part-") for a in arts), arts
    for p in PLUGINS:
        assert p in r.stdout


def test_a_killed_run_resumes_exactly_once(served, judge, tmp_path):
    _, base = served
    out = tmp_path / "rt"
    judge.gate, judge.watch = threading.Event(), out / "attacks" / "data"
    argv = _argv(base, judge, out, "--no-track", "--plugins", "privacy,security")
    proc = subprocess.Popen(
        [K2, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not any(judge.watch.glob("*.jsonl")):  # the first shard committed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        time.sleep(0.3)  # the run is now blocked on the judge
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        judge.gate.set()
    before = {x["id"] for x in read_outputs(str(out / "attacks"))}
    total = 2 * len(STRATEGIES) * 2
    assert 0 < len(before) < total
    judge.gate, judge.watch = None, None
    report = tmp_path / "report.json"
    r = run_k2(*argv, "--report", str(report))
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["complete"] and rep["attempts"] == total
    assert rep["attempts_this_run"] == total - len(before)  # only what was not committed
    ids = [x["id"] for x in read_outputs(str(out / "attacks"))]
    assert len(ids) == len(set(ids)) == total and before <= set(ids)


def test_parse_seeds_takes_json_or_lines():
    assert parse_seeds('{"prompts": ["a b c", "d e f", "g h i"]}', 2) == ["a b c", "d e f"]
    assert parse_seeds("1. first one\n- second one\n\nx\n", 5) == ["first one", "second one"]
    assert parse_seeds("", 3) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "basic,jedi"], "--strategies: unknown ['jedi']; choose from basic"),
        (["--plugins", ""], "--plugins: unknown"),
        (["--attacker", "ollama"], "--attacker: give http(s)://HOST/v1[#MODEL] or k2:CHECKPOINT"),
        (["--temperature", "9"], "--temperature: Input should be less than or equal to 2"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    argv = ["redteam", "--base-url", "http://127.0.0.1:9", "--model", "m", "--no-track"]
    assert k2_main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2: config error:") and "\n" not in err and message in err, err


def test_attacker_and_judge_may_be_a_k2_checkpoint_or_any_endpoint():
    from k2_data.pipeline import build_generator
    from k2_rl.evaluation.agentic.common import generator_spec

    spec = generator_spec("k2:runs/sft-math", "http://h:1", "m", "--judge", 64)
    assert spec.name == "k2" and spec.options["checkpoint"] == "runs/sft-math"
    assert type(build_generator(spec)).__name__ == "LocalGenerator"  # loads on first use
    spec = generator_spec("http://vllm:8000#Qwen/Qwen3-8B", "http://h:1", "m", "--judge")
    assert spec.options["base_url"] == "http://vllm:8000/v1"
    assert spec.options["model"] == "Qwen/Qwen3-8B"
    assert generator_spec(None, "http://h:1/v1", "m", "--judge").options["model"] == "m"
