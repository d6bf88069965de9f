"""`k2 eval-toolcall`: the built-in suite, a real `k2 serve` (streamed under concurrency 32),
a scripted endpoint whose every fault lands in its own category, and one-line bad input.

Time budget: ~25 s on the 2-core box (the tiny checkpoint trains once per process, ~8 s,
shared with the other agentic tests; k2 serve starts in ~5 s; each CLI run ~2 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agentic_helpers import Scripted, chat_body, run_k2, serve_tiny, stop_server, weather_suite
from k2_core.cli import main as k2_main
from k2_rl.evaluation.agentic.suite import HAND_SPECS, generate_suite, load_suite, schema_features
from k2_rl.evaluation.agentic.toolcall import CATEGORIES, ToolcallOptions, run_toolcall

SUITE_DATA = (
    Path(__file__).resolve().parents[2]
    / "packages/rl/src/k2_rl/evaluation/agentic"
    / "data/toolcall_suite.jsonl"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(k2 serve process, base URL) of the tiny chat model, named `tiny`."""
    proc, base = serve_tiny(tmp_path_factory)
    yield proc, base
    stop_server(proc)


def test_builtin_suite_is_the_checked_in_generator_output_and_self_consistent():
    from jsonschema import Draft202012Validator

    lines = [json.loads(x) for x in SUITE_DATA.read_text().splitlines()]
    assert lines == json.loads(json.dumps(generate_suite(HAND_SPECS)))  # deterministic
    cases = load_suite("builtin")
    assert len(cases) == len(lines) >= 60
    specs = {s["function"]["name"]: s["function"]["parameters"] for s in HAND_SPECS}
    for c in cases:  # every expectation the generator wrote is itself schema-valid
        for name, args in c.expect.args.items():
            assert not list(Draft202012Validator(specs[name]).iter_errors(args)), c.id
    feats = {f for c in cases for f in c.features}
    assert {
        "nested_object",
        "array",
        "enum",
        "optional",
        "multi_tool",
        "parallel",
        "tool_choice_required",
        "tool_choice_named",
        "tool_choice_none",
        "tool_result",
        "no_call",
    } <= feats
    assert schema_features(HAND_SPECS[1]) == ["enum", "nested_object", "optional"]


def test_suite_from_synth_tools_agents_json(tmp_path):
    agents = {
        "agents": [
            {"id": "agent-0000", "tools": HAND_SPECS[:2]},
            {"id": "agent-0001", "tools": [HAND_SPECS[5], {"name": "bad name"}]},
        ]
    }
    (tmp_path / "agents.json").write_text(json.dumps(agents))
    out = tmp_path / "suite.jsonl"
    assert (
        k2_main(
            ["eval-toolcall", "--write-suite", str(out), "--specs", str(tmp_path / "agents.json")]
        )
        == 0
    )
    cases = load_suite(str(out))
    assert {c.id.split("/")[0] for c in cases} == {"get_weather", "search_flights", "lookup_order"}


def test_k2_serve_streamed_at_concurrency_32_equals_non_streamed(served, tmp_path):
    _, base = served
    suite = weather_suite(tmp_path / "suite.jsonl", repeat=6)  # 36 cases, 72 requests
    report = tmp_path / "report.json"
    r = run_k2(
        "eval-toolcall",
        "--base-url",
        base,
        "--model",
        "tiny",
        "--suite",
        str(suite),
        "--stream",
        "--concurrency",
        "32",
        "--max-tokens",
        "48",
        "--no-track",
        "--report",
        str(report),
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    print(r.stdout)
    assert rep["n_cases"] == 36 and rep["options"]["concurrency"] == 32
    for k in (
        "stream_mismatch",
        "transport_error",
        "http_error",
        "stream_error",
        "malformed_response",
    ):
        assert rep["counts"][k] == 0, (k, rep["counts"])
    for case in rep["cases"]:  # both answers arrived, and the stream really was chunked
        assert case["answer"]["chunks"] >= 3 and case["non_streamed"]["error"] is None
    # the memorised call is parsed into tool_calls, streamed and not, under every tool_choice
    for kind in ("auto", "required", "named"):
        assert rep["by_feature"][kind]["valid_rate"] == 1.0, rep["by_feature"][kind]
    call = next(c for c in rep["cases"] if c["kind"] == "auto")["answer"]["message"]
    assert call["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }
    assert "valid" in r.stdout and "stream_mismatch" in r.stdout
    # --min-valid above what was measured: the run says so and exits 1
    r2 = run_k2(
        "eval-toolcall",
        "--base-url",
        base,
        "--model",
        "tiny",
        "--suite",
        str(suite),
        "--limit",
        "6",
        "--max-tokens",
        "48",
        "--no-track",
        "--min-valid",
        "1.0",
    )
    assert r2.returncode == 1 and "below --min-valid" in r2.stdout


FAULTS = {
    # user text -> (answer body, the categories it must land in)
    "ok": (chat_body(None, [("get_weather", '{"city": "Paris"}')], "tool_calls"), []),
    "envelope": (
        chat_body(
            "<|tool_calls_section_begin|><|tool_call_begin|>functions."
            'get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
        ),
        ["envelope_in_content"],
    ),
    "truncated": (
        chat_body(None, [("get_weather", '{"city": "Pa')], "tool_calls"),
        ["args_truncated"],
    ),
    "bad_json": (
        chat_body(None, [("get_weather", "city=Paris")], "tool_calls"),
        ["args_invalid_json"],
    ),
    "unknown_name": (
        chat_body(None, [("get_wether", '{"city": "Paris"}')], "tool_calls"),
        ["unknown_tool"],
    ),
    "wrong_name": (
        chat_body(None, [("lookup_order", '{"order_id": "ORD-12345"}')], "tool_calls"),
        ["wrong_tool"],
    ),
    "one_of_two": (
        chat_body(None, [("get_weather", '{"city": "Paris"}')], "tool_calls"),
        ["missing_tool"],
    ),
    "schema": (
        chat_body(None, [("get_weather", '{"city": 7}')], "tool_calls"),
        ["args_schema_invalid"],
    ),
    "mismatch": (
        chat_body(None, [("get_weather", '{"city": "Lima"}')], "tool_calls"),
        ["args_mismatch"],
    ),
    "missed": (chat_body("It is sunny."), ["missed_call"]),
    "finish": (
        chat_body(None, [("get_weather", '{"city": "Paris"}')], "length"),
        ["finish_inconsistent"],
    ),
    "no_call_finish": (
        chat_body("Sunny.", None, "tool_calls"),
        ["missed_call", "finish_inconsistent"],
    ),
    "malformed_call": (
        {
            **chat_body(None),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "tool_calls": [{"function": {}}]},
                }
            ],
        },
        ["malformed_call"],
    ),
    "http500": ({"__raw__": (500, '{"error": "boom"}')}, ["http_error"]),
    "garbage": ({"__raw__": (200, "<html>")}, ["malformed_response"]),
    "no_choices": ({"__raw__": (200, '{"choices": []}')}, ["malformed_response"]),
}
STREAM_FAULTS = {
    # streamed differently from the plain answer / not a parseable stream
    "stream_diff": ([], ["stream_mismatch"]),
    "stream_broken": ([], ["stream_error"]),
}


def _fake_reply(body):
    text = body["messages"][-1]["content"]
    fault = text.split(":", 1)[1]
    if fault in STREAM_FAULTS:
        plain = chat_body(None, [("get_weather", '{"city": "Paris"}')], "tool_calls")
        if not body.get("stream"):
            return plain
        if fault == "stream_broken":
            return {"__raw__": (200, "data: {not json\n\n")}
        other = chat_body(None, [("get_weather", '{"city":"Paris"}')], "tool_calls")
        return other  # same call, different argument text: streamed != plain
    return FAULTS[fault][0]


def test_a_faulty_endpoint_lands_each_fault_in_its_own_category(tmp_path):
    from k2_rl.evaluation.agentic.suite import Case

    tools = [HAND_SPECS[0], HAND_SPECS[5]]
    expect = {
        "call": "must",
        "tools": ["get_weather"],
        "min_calls": 1,
        "args": {"get_weather": {"city": "Paris"}},
    }

    both = {"call": "must", "tools": ["get_weather", "lookup_order"], "min_calls": 2}

    def cases(names):
        return [
            Case(
                id=f,
                kind=f,
                features=[f],
                tools=tools,
                expect=both if f == "one_of_two" else expect,
                messages=[{"role": "user", "content": f"FAULT:{f}"}],
            )
            for f in names
        ]

    want = {f: v[1] for f, v in FAULTS.items()}
    # streamed, the same faults land in the same categories (the assembler rebuilds the
    # message); a 200 that is not an event stream is a stream error there
    streamed = {f: v for f, v in want.items() if f != "malformed_call"}
    streamed.update(
        garbage=["stream_error"],
        no_choices=["stream_error"],
        **{f: v[1] for f, v in STREAM_FAULTS.items()},
    )
    fake = Scripted(_fake_reply)
    try:
        plain = run_toolcall(
            cases(want), fake.base_url, "fake", ToolcallOptions(concurrency=8, timeout_s=10)
        )
        stream = run_toolcall(
            cases(streamed),
            fake.base_url,
            "fake",
            ToolcallOptions(stream=True, concurrency=8, timeout_s=10),
        )
    finally:
        fake.stop()
    assert {c["id"]: c["failures"] for c in plain["cases"]} == want
    assert {c["id"]: c["failures"] for c in stream["cases"]} == streamed
    assert plain["valid"] == 1 and set(plain["counts"]) == set(CATEGORIES)
    assert plain["counts"]["envelope_in_content"] == 1 and plain["counts"]["missed_call"] == 2


@pytest.mark.parametrize(
    "content,args,message",
    [
        (
            '{"id": "a", "messages": [{"role": "user", "content": "x"}], '
            '"expect": {"call": "maybe"}}',
            [],
            "line 1: expect.call: Input should be 'must' or 'must_not'",
        ),
        ("not json", [], "line 1: not a JSON object"),
        (
            '{"id": "a", "messages": [{"role": "user", "content": "x"}], '
            '"expect": {"call": "must", "tools": ["ghost"]}}',
            [],
            "line 1: expect.tools: ['ghost'] are not in tools",
        ),
        (None, [], "cannot read it (No such file or directory)"),
        ("", ["--base-url", "ftp://x"], "--base-url: must be an http(s) URL"),
        ("", ["--min-valid", "7"], "--min-valid: must be within [0, 1]"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_exit_2(tmp_path, capsys, content, args, message):
    suite = tmp_path / "s.jsonl"
    if content is not None:
        suite.write_text(
            content
            or json.dumps(
                {
                    "id": "a",
                    "messages": [{"role": "user", "content": "x"}],
                    "expect": {"call": "must_not"},
                }
            )
        )
    argv = [
        "eval-toolcall",
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--suite",
        str(suite),
        "--no-track",
    ]
    assert k2_main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2: config error:") and "\n" not in err and message in err, err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        k2_main(["eval-toolcall", "--base-url", "http://x", "--model", "m", "--concurrency", "0"])
    assert e.value.code == 2
