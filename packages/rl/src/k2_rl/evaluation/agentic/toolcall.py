"""`k2 eval-toolcall`: tool-call conformance of any OpenAI-compatible endpoint.

Every case of the suite is sent as one chat request (with `--stream`: once streamed and once
not, same seed); each answer gets a list of failure categories (empty: valid). Categories are
independent findings, so one answer may carry several (an unknown tool name and a bad
finish_reason). A K2 tool-call envelope left in `content` is its own category and does not
also count as a missed call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .client import ChatClient, Reply
from .suite import Case

# K2's envelope markers (k2_data.chat); any of them in `content` means the server did not
# parse the model's tool call.
ENVELOPE_MARKERS = (
    "<|tool_calls_section_begin|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|tool_calls_section_end|>",
)
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")

CATEGORIES: dict[str, str] = {
    "transport_error": "no answer: connection refused/reset or timeout",
    "http_error": "a non-200 status",
    "malformed_response": "200 but not a chat completion (no JSON, no choices, no message)",
    "stream_error": "a stream that does not parse or ends without [DONE]",
    "envelope_in_content": "K2 tool-call markers in content, not parsed into tool_calls",
    "missed_call": "no tool call where the case demands one",
    "unwanted_call": "a tool call where the case forbids one",
    "malformed_call": "a tool_calls entry without function.name/arguments strings",
    "unknown_tool": "a call to a tool the request did not declare",
    "wrong_tool": "a declared tool other than the expected one(s)",
    "missing_tool": "right tools but too few: an expected one left uncalled (parallel cases)",
    "args_truncated": "arguments that stop mid-JSON",
    "args_invalid_json": "arguments that are not JSON (and not merely cut short)",
    "args_schema_invalid": "arguments that fail the tool's JSON Schema",
    "args_mismatch": "valid arguments without the values the user gave",
    "finish_inconsistent": "finish_reason unknown, missing, or at odds with the tool calls",
    "stream_mismatch": "the reassembled stream differs from the non-streamed answer",
}
ERROR_CATEGORY = {
    "connection": "transport_error",
    "timeout": "transport_error",
    "http_error": "http_error",
    "malformed_response": "malformed_response",
    "stream_error": "stream_error",
}


class ToolcallOptions(BaseModel):
    """How `k2 eval-toolcall` samples and runs the suite."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stream: bool = Field(
        False, description="Also stream every case; check it against the non-streamed answer."
    )
    concurrency: int = Field(8, gt=0, description="Requests in flight at most.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: greedy).")
    seed: int = Field(0, description="Request seed (the same for the streamed twin).")
    max_tokens: int = Field(256, gt=0, description="Completion limit per request.")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one request, seconds.")
    limit: int | None = Field(None, gt=0, description="The first N cases only.")


def _truncated(text: str, err: json.JSONDecodeError) -> bool:
    """Whether a JSON error is the input ending early (cut mid-value) rather than garbage."""
    return err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")


def _subset(want: Any, got: Any) -> bool:
    """`want` is contained in `got`: dict keys recursively, lists element-wise, numbers by value."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(
            k in got and _subset(v, got[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(want) == len(got)
            and all(_subset(a, b) for a, b in zip(want, got, strict=True))
        )
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if isinstance(want, int | float) and isinstance(got, int | float):
        return abs(float(want) - float(got)) <= 1e-9 * max(1.0, abs(float(want)))
    return want == got


def check_answer(case: Case, reply: Reply) -> list[str]:
    """The failure categories of one answer to `case` (empty: valid)."""
    from jsonschema import Draft202012Validator

    if reply.error is not None:
        return [ERROR_CATEGORY.get(reply.error, "malformed_response")]
    msg = reply.message or {}
    out: list[str] = []
    content = msg.get("content")
    text = content if isinstance(content, str) else json.dumps(content) if content else ""
    envelope = any(m in text for m in ENVELOPE_MARKERS)
    raw_calls = msg.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raw_calls = [raw_calls]
    calls = []
    for c in raw_calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            out.append("malformed_call")
        else:
            calls.append(fn)
    if envelope:
        out.append("envelope_in_content")
    exp = case.expect
    if exp.call == "must" and not calls and not envelope and "malformed_call" not in out:
        out.append("missed_call")
    if exp.call == "must_not" and (calls or "malformed_call" in out):
        out.append("unwanted_call")
    specs = {t["function"]["name"]: t["function"] for t in case.tools}
    called: set[str] = set()
    for fn in calls:
        name = fn["name"]
        if name not in specs:
            out.append("unknown_tool")
            continue
        called.add(name)
        if exp.call == "must" and exp.tools and name not in exp.tools:
            out.append("wrong_tool")
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError as e:
            out.append("args_truncated" if _truncated(fn["arguments"], e) else "args_invalid_json")
            continue
        schema = specs[name].get("parameters") or {"type": "object"}
        if next(iter(Draft202012Validator(schema).iter_errors(args)), None) is not None:
            out.append("args_schema_invalid")
        elif name in exp.args and not _subset(exp.args[name], args):
            out.append("args_mismatch")
    # only when every call named an expected tool: a wrong or unknown name is its own finding
    if (
        exp.call == "must"
        and calls
        and not {"unknown_tool", "wrong_tool"} & set(out)
        and (len(calls) < exp.min_calls or any(t not in called for t in exp.tools))
    ):
        out.append("missing_tool")
    finish = reply.finish_reason
    if (
        finish not in FINISH_REASONS
        or (finish == "tool_calls" and not raw_calls)
        or (raw_calls and finish not in ("tool_calls", "stop"))
    ):
        out.append("finish_inconsistent")
    return list(dict.fromkeys(out))  # each category once per answer


def comparable(reply: Reply) -> dict[str, Any]:
    """What must agree between a streamed and a non-streamed answer: content, the calls'
    names and argument text, finish_reason (call ids may be random per request)."""
    msg = reply.message or {}
    calls = []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else {}
        calls.append([(fn or {}).get("name"), (fn or {}).get("arguments")])
    return {
        "content": msg.get("content") or "",
        "tool_calls": calls,
        "finish_reason": reply.finish_reason,
    }


def payload(case: Case, opts: ToolcallOptions) -> dict[str, Any]:
    """The chat request body of a case."""
    body: dict[str, Any] = {
        "messages": case.messages,
        "temperature": opts.temperature,
        "seed": opts.seed,
        "max_tokens": opts.max_tokens,
    }
    if case.tools:
        body["tools"] = case.tools
    if case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    return body


async def _run_case(client: ChatClient, case: Case, opts: ToolcallOptions) -> dict[str, Any]:
    body = payload(case, opts)
    if opts.stream:
        plain, streamed = await asyncio.gather(client.chat(body), client.chat(body, stream=True))
        failures = check_answer(case, streamed)
        if (
            plain.error is None
            and streamed.error is None
            and comparable(plain) != comparable(streamed)
        ):
            failures.append("stream_mismatch")
        answer, twin = streamed, plain
    else:
        answer, twin = await client.chat(body), None
        failures = check_answer(case, answer)
    rec = {
        "id": case.id,
        "kind": case.kind,
        "features": case.features,
        "expect": case.expect.call,
        "failures": failures,
        "answer": answer.to_json(),
    }
    if twin is not None:
        rec["non_streamed"] = twin.to_json()
    return rec


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates overall, per category and per feature from per-case records."""
    n = len(records)
    counts: Counter[str] = Counter(f for r in records for f in r["failures"])
    valid = sum(1 for r in records if not r["failures"])
    must = [r for r in records if r["expect"] == "must"]
    must_not = [r for r in records if r["expect"] == "must_not"]

    def called(r: dict[str, Any]) -> bool:
        return bool((r["answer"].get("message") or {}).get("tool_calls"))

    by_feature: dict[str, dict[str, Any]] = {}
    for f in sorted({f for r in records for f in r["features"]}):
        rs = [r for r in records if f in r["features"]]
        c = Counter(x for r in rs for x in r["failures"])
        by_feature[f] = {
            "n": len(rs),
            "valid_rate": sum(not r["failures"] for r in rs) / len(rs),
            "top_failures": dict(c.most_common(3)),
        }
    return {
        "n_cases": n,
        "valid": valid,
        "valid_rate": valid / n if n else 0.0,
        "called_when_required": (sum(called(r) for r in must) / len(must)) if must else None,
        "silent_when_forbidden": (sum(not called(r) for r in must_not) / len(must_not))
        if must_not
        else None,
        "counts": {k: counts.get(k, 0) for k in CATEGORIES},
        "rates": {k: counts.get(k, 0) / n if n else 0.0 for k in CATEGORIES},
        "by_feature": by_feature,
    }


async def _evaluate(
    cases: list[Case], base_url: str, model: str, opts: ToolcallOptions, api_key_env: str
) -> list[dict[str, Any]]:
    client = ChatClient(
        base_url,
        model,
        api_key_env=api_key_env,
        timeout_s=opts.timeout_s,
        concurrency=opts.concurrency,
    )
    try:
        return list(await asyncio.gather(*(_run_case(client, c, opts) for c in cases)))
    finally:
        await client.aclose()


def run_toolcall(
    cases: list[Case],
    base_url: str,
    model: str,
    opts: ToolcallOptions,
    api_key_env: str = "OPENAI_API_KEY",
) -> dict[str, Any]:
    """Run the suite against the endpoint; the report (summary, settings, per-case records)."""
    if opts.limit is not None:
        cases = cases[: opts.limit]
    t0 = time.perf_counter()
    records = asyncio.run(_evaluate(cases, base_url, model, opts, api_key_env))
    seconds = time.perf_counter() - t0
    requests = len(records) * (2 if opts.stream else 1)
    return {
        "command": "eval-toolcall",
        "base_url": base_url,
        "model": model,
        "options": opts.model_dump(),
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / max(seconds, 1e-9), 2),
        **summarize(records),
        "cases": records,
    }


def format_report(rep: dict[str, Any]) -> str:
    """The report as a terminal table: overall, per category, per feature."""
    o = rep["options"]
    lines = [
        f"eval-toolcall {rep['model']} @ {rep['base_url']}: {rep['n_cases']} cases"
        f"{' (streamed + plain)' if o['stream'] else ''}, concurrency {o['concurrency']}, "
        f"{rep['seconds']:.1f} s",
        f"valid {rep['valid']}/{rep['n_cases']} = {rep['valid_rate']:.3f}",
    ]
    cr, sf = rep["called_when_required"], rep["silent_when_forbidden"]
    lines.append(
        "called when required: "
        + ("-" if cr is None else f"{cr:.3f}")
        + "   no call when forbidden: "
        + ("-" if sf is None else f"{sf:.3f}")
    )
    lines += ["", f"{'category':<22}{'count':>7}{'rate':>8}  meaning"]
    for k, meaning in CATEGORIES.items():
        if k == "stream_mismatch" and not o["stream"]:
            continue
        lines.append(f"{k:<22}{rep['counts'][k]:>7}{rep['rates'][k]:>8.3f}  {meaning}")
    lines += ["", f"{'feature':<22}{'n':>5}{'valid':>8}  most frequent failures"]
    for f, v in rep["by_feature"].items():
        top = ", ".join(f"{k} {c}" for k, c in v["top_failures"].items()) or "-"
        lines.append(f"{f:<22}{v['n']:>5}{v['valid_rate']:>8.3f}  {top}")
    return "\n".join(lines)
