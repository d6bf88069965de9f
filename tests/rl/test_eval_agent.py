"""`k2 eval-agent`: episodes of the tiny model behind a real `k2 serve`, with the simulated
user, tool world model and judge played by a scripted endpoint; every outcome (success,
failure, unjudged, turn/token/time limit) counted as its own, and a run whose judge failed
resumes with each episode committed exactly once.

Time budget: ~20 s on the 2-core box beside the shared tiny checkpoint (trained once per
session, see agentic_helpers.tiny_checkpoint).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from agentic_helpers import TOOLS, Scripted, chat_body, run_k2, serve_tiny, stop_server
from k2_core.cli import main as k2_main
from k2_data.pipeline import GeneratorSpec, read_outputs
from k2_rl.evaluation.agentic.agent import (
    AgentOptions,
    load_tasks,
    run_eval_agent,
    sample_tasks,
)

AGENT = {"id": "weather", "system_prompt": "", "tools": TOOLS}


def _task(tid: str, desc: str) -> dict:
    return {
        "id": tid,
        "agent": AGENT,
        "task": {
            "description": desc,
            "success_criteria": ["the weather of Paris is given"],
            "expected_tools": ["get_weather"],
            "checkpoints": [],
        },
    }


TASKS = [
    _task("ok-1", "Learn the weather in Paris."),
    _task("ok-2", "Weather of Paris, now."),
    _task("unjudged", "Paris weather UNJUDGED"),
    _task("fail", "Paris weather FAILME"),
    _task("judge500", "Paris weather JUDGE500"),
    _task("never", "Chat forever NEVERDONE"),
]


class Sims:
    """The simulated user, tool world model and judge, on one scripted endpoint."""

    def __init__(self) -> None:
        self.judge_down = False
        self.fake = Scripted(self.reply)

    def reply(self, body: dict) -> dict:
        system = body["messages"][0]["content"]
        last = body["messages"][-1]["content"]
        if "role-playing a user" in system:
            if "NEVERDONE" in system:
                return chat_body("And what else can you tell me?")
            spoke = any(m["role"] == "assistant" for m in body["messages"][1:])
            return chat_body("[DONE]" if spoke else "What is the weather in Paris?")
        if system.startswith("You simulate the backend"):
            return chat_body(json.dumps({"result": {"celsius": 21}, "state": {"asked": 1}}))
        assert system.startswith("You grade"), system
        if "UNJUDGED" in last:
            return chat_body("It looks fine to me.")
        if "JUDGE500" in last and self.judge_down:
            return {"__raw__": (500, "{}")}
        ok = "FAILME" not in last
        return chat_body(
            json.dumps({"score": 0.9 if ok else 0.1, "passed": ok, "reasons": "checked"})
        )

    def gen(self) -> str:
        return f"{self.fake.base_url}#fake"

    def judged(self) -> Counter:
        """Judge requests per task marker."""
        c: Counter = Counter()
        for b in self.fake.requests:
            if b["messages"][0]["content"].startswith("You grade"):
                text = b["messages"][-1]["content"]
                c[next((t["id"] for t in TASKS if t["task"]["description"] in text), "?")] += 1
        return c


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(k2 serve process, base URL) of the tiny chat model."""
    proc, base = serve_tiny(tmp_path_factory)
    yield proc, base
    stop_server(proc)


@pytest.fixture
def sims():
    s = Sims()
    yield s
    s.fake.stop()


def test_episodes_through_k2_serve_resume_exactly_once(served, sims, tmp_path):
    _, base = served
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    out, report = tmp_path / "run", tmp_path / "report.json"
    argv = [
        "eval-agent",
        "--base-url",
        base,
        "--model",
        "tiny",
        "--tasks",
        str(tasks),
        "--user",
        sims.gen(),
        "--tool-sim",
        sims.gen(),
        "--judge",
        sims.gen(),
        "--max-turns",
        "2",
        "--max-tokens-per-turn",
        "48",
        "--concurrency",
        "6",
        "--out",
        str(out),
        "--report",
        str(report),
        "--no-track",
    ]
    sims.judge_down = True  # one episode's judge fails: it stays pending
    r = run_k2(*argv)
    assert r.returncode == 1, r.stderr
    first = json.loads(report.read_text())
    assert not first["complete"] and first["episodes"] == 5 and "rerun" in r.stdout
    sims.judge_down = False
    r = run_k2(*argv)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    rep = json.loads(report.read_text())
    assert rep["complete"] and rep["episodes_this_run"] == 1
    recs = read_outputs(str(out))
    assert sorted(x["id"] for x in recs) == sorted(t["id"] for t in TASKS)  # each exactly once
    judged = sims.judged()
    assert all(judged[t] == 1 for t in ("ok-1", "ok-2", "unjudged", "fail")), judged
    assert judged["never"] == 0  # a limit is an outcome of its own, never judged
    by = {x["id"]: x for x in recs}
    assert by["ok-1"]["outcome"] == by["ok-2"]["outcome"] == by["judge500"]["outcome"] == "success"
    assert by["fail"]["outcome"] == "failure"
    assert by["unjudged"]["outcome"] == "unjudged" and by["unjudged"]["judge"] is None
    assert by["never"]["outcome"] == "turn_limit" and by["never"]["turns"] == 2
    # the tiny model makes its memorised call; the tool world model answered it
    ep = by["ok-1"]
    assert ep["tool_calls"] >= 1 and ep["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }
    assert json.loads(ep["messages"][2]["content"]) == {"celsius": 21}
    assert rep["outcomes"]["unjudged"] == 1 and rep["success_rate"] == pytest.approx(3 / 6)
    assert rep["success_rate_judged"] == pytest.approx(3 / 4)  # unjudged is neither
    assert rep["tokens_per_episode"] > 0 and rep["calls_per_episode"] >= 1
    assert "task success" in r.stdout and "invalid-call rate" in r.stdout


def test_token_and_time_limits_are_outcomes(served, sims, tmp_path):
    _, base = served
    roles = {
        k: GeneratorSpec(
            name="openai",
            options={
                "base_url": sims.fake.base_url,
                "model": "fake",
                "temperature": 0.0,
                "allow_truncated": True,
            },
        )
        for k in ("user", "tool", "judge")
    }
    tasks = [TASKS[0]]
    rep = run_eval_agent(
        tasks,
        base,
        "tiny",
        AgentOptions(max_tokens=4, max_tokens_per_turn=48),
        roles,
        str(tmp_path / "tokens"),
        concurrency=1,
    )
    assert rep["outcomes"]["token_limit"] == 1 and rep["tokens_per_episode"] >= 4
    rep = run_eval_agent(
        tasks,
        base,
        "tiny",
        AgentOptions(max_seconds=0.001),
        roles,
        str(tmp_path / "time"),
        concurrency=1,
    )
    assert rep["outcomes"]["time_limit"] == 1


def test_builtin_tasks_and_seed_stable_sample():
    tasks = load_tasks(None)
    assert len(tasks) == 8 and all(t["agent"]["tools"] for t in tasks)
    a = [t["id"] for t in sample_tasks(tasks, 3, seed=1)]
    assert a == [t["id"] for t in sample_tasks(tasks, 3, seed=1)]
    assert [t["id"] for t in sample_tasks(tasks, 5, seed=1)][:3] == a  # grows, keeps the sample
    assert [t["id"] for t in sample_tasks(tasks, 3, seed=2)] != a


@pytest.mark.parametrize(
    "line,args,message",
    [
        (
            '{"id": "a", "agent": {"tools": []}, "task": {"description": "x"}}',
            [],
            "line 1: agent.tools: List should have at least 1 item",
        ),
        (
            '{"id": "a", "agent": {"tools": [{"name": "bad name"}]}, "task": {"description": "x"}}',
            [],
            "line 1: agent.tools.0: bad_name",
        ),
        ("[1]", [], "line 1: not a JSON object"),
        (None, ["--max-seconds", "-1"], "--max-seconds: Input should be greater than 0"),
        (None, ["--judge", "gpt"], "--judge: give http(s)://HOST/v1[#MODEL] or k2:CHECKPOINT"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, line, args, message):
    argv = ["eval-agent", "--base-url", "http://127.0.0.1:9", "--model", "m", "--no-track"]
    if line is not None:
        (tmp_path / "t.jsonl").write_text(line + "\n")
        argv += ["--tasks", str(tmp_path / "t.jsonl")]
    assert k2_main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2: config error:") and "\n" not in err and message in err, err
