"""The tool-call conformance suite: its case format, its loader, and its generator.

A case is one chat request with `tools` plus the expectation its generator wrote (never a
model): must / must not call, which tool(s), how many calls, and argument values the call
must carry. The built-in suite (`data/toolcall_suite.jsonl`) is `generate_suite(HAND_SPECS)`
checked in; `generate_suite` takes the specs `k2 synth-tools` writes (its `agents.json`, or
records of its tools stage) just the same.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

BUILTIN = "builtin"
SUITE_FILE = "toolcall_suite.jsonl"


class Expectation(BaseModel):
    """What a correct answer does (written by the generator from the case's template)."""

    model_config = ConfigDict(extra="forbid")
    call: Literal["must", "must_not"] = Field(..., description="Must the answer call a tool?")
    tools: list[str] = Field(
        default_factory=list, description="Tools the calls must be among, and all be called."
    )
    min_calls: int = Field(0, ge=0, description="Tool calls at least (parallel calls: 2).")
    args: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per tool: values its arguments must contain "
        "(a deep subset; numbers compare by value).",
    )


class Case(BaseModel):
    """One request of the suite and its expectation."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., min_length=1, description="Unique case id.")
    kind: str = Field("custom", description="The template that made it.")
    features: list[str] = Field(
        default_factory=list, description="Schema/request features, for the per-feature rates."
    )
    messages: list[dict[str, Any]] = Field(..., min_length=1, description="The conversation.")
    tools: list[dict[str, Any]] = Field(default_factory=list, description="OpenAI tool specs.")
    tool_choice: Any = Field(None, description="none, auto, required or a named function.")
    expect: Expectation = Field(..., description="What a correct answer does.")


def load_suite(path: str) -> list[Case]:
    """The cases of a JSONL suite (`builtin`: the packaged one); ConfigError naming the file,
    line and field of the first bad case."""
    if path == BUILTIN:
        text = resources.files("k2_rl.evaluation.agentic").joinpath("data", SUITE_FILE).read_text()
        where = f"builtin suite ({SUITE_FILE})"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--suite {path}: cannot read it ({e.strerror})") from None
        where = f"--suite {path}"
    cases: list[Case] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where} line {n}: not a JSON object") from None
        try:
            case = Case.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "case"
            raise ConfigError(f"{where} line {n}: {loc}: {err['msg']}") from None
        names = set()
        for k, t in enumerate(case.tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ConfigError(f"{where} line {n}: tools.{k}: needs function.name")
            names.add(fn["name"])
        unknown = [t for t in case.expect.tools if t not in names]
        if unknown:
            raise ConfigError(f"{where} line {n}: expect.tools: {unknown} are not in tools")
        if case.id in seen:
            raise ConfigError(f"{where} line {n}: id: {case.id!r} repeats an earlier case")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise ConfigError(f"{where}: holds no cases")
    return cases


# -- hand-written specs ------------------------------------------------------------------


def _fn(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


HAND_SPECS: list[dict[str, Any]] = [
    _fn(
        "get_weather",
        "Get the current weather of a city.",
        {
            "city": {"type": "string", "examples": ["Paris", "Lima", "Osaka"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        ["city"],
    ),
    _fn(
        "search_flights",
        "Search flights between two airports on a date.",
        {
            "origin": {"type": "string", "examples": ["CDG", "JFK", "NRT"]},
            "destination": {"type": "string", "examples": ["LHR", "SFO", "SIN"]},
            "date": {
                "type": "string",
                "pattern": "^\\d{4}-\\d{2}-\\d{2}$",
                "examples": ["2026-03-14", "2026-07-01"],
            },
            "passengers": {
                "type": "object",
                "properties": {
                    "adults": {"type": "integer", "minimum": 1, "maximum": 6},
                    "children": {"type": "integer", "minimum": 0, "maximum": 4},
                },
                "required": ["adults"],
            },
            "cabin": {"type": "string", "enum": ["economy", "business", "first"]},
        },
        ["origin", "destination", "date", "passengers"],
    ),
    _fn(
        "create_event",
        "Create a calendar event with attendees and reminders.",
        {
            "title": {"type": "string", "examples": ["Design review", "Dentist"]},
            "start": {"type": "string", "examples": ["2026-05-02T10:00", "2026-05-03T15:30"]},
            "attendees": {
                "type": "array",
                "items": {"type": "string"},
                "examples": [["ana@example.com", "bo@example.com"]],
            },
            "reminders": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "minutes": {"type": "integer", "minimum": 0, "maximum": 1440},
                        "method": {"type": "string", "enum": ["email", "popup"]},
                    },
                    "required": ["minutes", "method"],
                },
            },
        },
        ["title", "start", "attendees"],
    ),
    _fn(
        "transfer_money",
        "Transfer money between two accounts.",
        {
            "from_account": {"type": "string", "examples": ["CHK-1001", "SAV-2002"]},
            "to_account": {"type": "string", "examples": ["SAV-3003", "CHK-4004"]},
            "amount": {"type": "number", "minimum": 0.01, "maximum": 10000},
            "currency": {"type": "string", "enum": ["EUR", "USD", "JPY"]},
        },
        ["from_account", "to_account", "amount", "currency"],
    ),
    _fn(
        "add_todo",
        "Add an item to the to-do list.",
        {
            "text": {"type": "string", "examples": ["buy milk", "call the plumber"]},
            "priority": {"type": "string", "enum": ["low", "normal", "high"]},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "examples": [["home"], ["work"]],
            },
        },
        ["text"],
    ),
    _fn(
        "lookup_order",
        "Look up an order by its id.",
        {
            "order_id": {
                "type": "string",
                "pattern": "^ORD-\\d{5}$",
                "examples": ["ORD-12345", "ORD-00042"],
            },
            "include_items": {"type": "boolean"},
        },
        ["order_id"],
    ),
    _fn(
        "set_thermostat",
        "Set the target temperature of a room.",
        {
            "room": {"type": "string", "enum": ["kitchen", "bedroom", "office"]},
            "celsius": {"type": "number", "minimum": 10, "maximum": 30},
        },
        ["room", "celsius"],
    ),
    _fn(
        "send_email",
        "Send an email.",
        {
            "to": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "examples": [["kim@example.com"], ["lee@example.com", "ray@example.com"]],
            },
            "subject": {"type": "string", "examples": ["Invoice", "Lunch"]},
            "body": {"type": "string", "examples": ["See attached.", "Noon works for me."]},
            "cc": {
                "type": "array",
                "items": {"type": "string"},
                "examples": [["boss@example.com"]],
            },
        },
        ["to", "subject", "body"],
    ),
]


def specs_from_synth_tools(path: str) -> list[dict[str, Any]]:
    """Tool specs from `k2 synth-tools` output: its `agents.json` (agents[].tools) or a JSONL
    of its tools stage (records with `valid` and `spec`); ConfigError naming the file."""
    from k2_data.synth_tools import SpecError, validate_spec

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--specs {path}: cannot read it ({e.strerror})") from None
    raw: list[Any] = []
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("agents"), list):
            raw = [t for a in obj["agents"] for t in a.get("tools", [])]
        elif isinstance(obj, list):
            raw = obj
    except ValueError:
        for line in text.splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise ConfigError(f"--specs {path}: neither agents.json nor JSONL") from None
                if isinstance(rec, dict) and rec.get("valid") and "spec" in rec:
                    raw.append(rec["spec"])
    specs, seen = [], set()
    for spec in raw:
        try:
            s = validate_spec(spec)
        except SpecError:
            continue  # synth-tools keeps invalid specs for counting; a suite cannot use them
        if s["function"]["name"] not in seen:
            seen.add(s["function"]["name"])
            specs.append(s)
    if not specs:
        raise ConfigError(f"--specs {path}: holds no valid tool spec")
    return specs


# -- the generator -----------------------------------------------------------------------

_WORDS = ["alpha", "blue", "delta", "north", "river", "summit", "violet", "zephyr"]


def _value(schema: dict[str, Any], name: str, rng: random.Random, full: bool) -> Any:
    """A value that satisfies `schema` (its examples, enum or bounds), chosen by `rng`."""
    if "examples" in schema and schema["examples"]:
        return rng.choice(schema["examples"])
    if "enum" in schema:
        return rng.choice(schema["enum"])
    t = schema.get("type")
    if t == "integer":
        lo, hi = int(schema.get("minimum", 1)), int(schema.get("maximum", 9))
        return rng.randint(lo, hi)
    if t == "number":
        lo, hi = float(schema.get("minimum", 1)), float(schema.get("maximum", 99))
        return round(rng.uniform(lo, hi), 2) if hi - lo >= 1 else lo
    if t == "boolean":
        return rng.random() < 0.5
    if t == "array":
        items = schema.get("items") or {"type": "string"}
        n = max(1, int(schema.get("minItems", 1)))
        return [_value(items, name, rng, full) for _ in range(n)]
    if t == "object":
        return _object(schema, rng, full)
    return f"{name.replace('_', ' ')} {rng.choice(_WORDS)}"


def _object(schema: dict[str, Any], rng: random.Random, full: bool) -> dict[str, Any]:
    props = schema.get("properties") or {}
    req = set(schema.get("required") or [])
    return {k: _value(s, k, rng, full) for k, s in props.items() if k in req or full}


def schema_features(spec: dict[str, Any]) -> list[str]:
    """The schema shapes a spec exercises: nested_object, array, enum, optional."""
    out: set[str] = set()

    def walk(s: Any, top: bool) -> None:
        if not isinstance(s, dict):
            return
        if "enum" in s:
            out.add("enum")
        if s.get("type") == "array":
            out.add("array")
            walk(s.get("items"), False)
        if s.get("type") == "object":
            if not top:
                out.add("nested_object")
            props = s.get("properties") or {}
            if set(props) - set(s.get("required") or []):
                out.add("optional")
            for p in props.values():
                walk(p, False)

    walk(spec["function"]["parameters"], True)
    return sorted(out)


def _has_optional(spec: dict[str, Any]) -> bool:
    p = spec["function"]["parameters"]
    return bool(set(p.get("properties") or {}) - set(p.get("required") or []))


def _ask(spec: dict[str, Any], args: dict[str, Any]) -> str:
    fn = spec["function"]
    return (
        f"{fn['description'].rstrip('.')}, please. Use exactly these details: "
        f"{json.dumps(args, ensure_ascii=False)}"
    )


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(seed * 1_000_003 + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))


def generate_suite(specs: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Cases from templates over `specs` (deterministic in specs and seed): single call,
    optional fields, tool_choice required/named/none, no call needed, parallel calls, and
    conversations holding an earlier tool result (call again, or answer from it)."""
    n = len(specs)
    cases: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        name = spec["function"]["name"]
        other = specs[(i + 1) % n]
        oname = other["function"]["name"]
        third = specs[(i + 2) % n]
        rng = _rng(seed, name)
        feats = schema_features(spec)
        tools = [spec, other, third] if n >= 3 else list(specs)
        rng.shuffle(tools)
        multi = ["multi_tool"] if len(tools) > 1 else []
        args = _object(spec["function"]["parameters"], rng, full=False)
        user = [{"role": "user", "content": _ask(spec, args)}]

        def add(
            kind: str,
            extra: list[str],
            messages: list[dict[str, Any]],
            expect: dict[str, Any],
            choice: Any = None,
            tl: list | None = None,
            f: list[str] = feats,
            nm: str = name,
            own: list = tools,
        ) -> None:
            case: dict[str, Any] = {
                "id": f"{nm}/{kind}",
                "kind": kind,
                "features": sorted(set(f + extra)),
                "messages": messages,
                "tools": tl if tl is not None else own,
                "expect": expect,
            }
            if choice is not None:
                case["tool_choice"] = choice
            cases.append(case)

        must = {"call": "must", "tools": [name], "min_calls": 1, "args": {name: args}}
        add("single", multi, user, must)
        if _has_optional(spec):
            full = _object(spec["function"]["parameters"], rng, full=True)
            add(
                "optional_fields",
                multi + ["optional_given"],
                [{"role": "user", "content": _ask(spec, full)}],
                {**must, "args": {name: full}},
            )
        add("choice_required", multi + ["tool_choice_required"], user, must, "required")
        named = {"type": "function", "function": {"name": name}}
        add("choice_named", multi + ["tool_choice_named"], user, must, named)
        add("choice_none", multi + ["tool_choice_none"], user, {"call": "must_not"}, "none")
        add(
            "no_call_needed",
            multi + ["no_call"],
            [
                {
                    "role": "user",
                    "content": "Thanks, that is all for today. Reply with a short "
                    "goodbye and do not use any tool.",
                }
            ],
            {"call": "must_not"},
        )
        if oname != name:
            oargs = _object(
                other["function"]["parameters"], _rng(seed, f"{name}>{oname}"), full=False
            )
            both = [
                {
                    "role": "user",
                    "content": f"Do two things at once. First: {_ask(spec, args)}"
                    f". Second: {_ask(other, oargs)}",
                }
            ]
            add(
                "parallel",
                ["multi_tool", "parallel"],
                both,
                {
                    "call": "must",
                    "tools": [name, oname],
                    "min_calls": 2,
                    "args": {name: args, oname: oargs},
                },
                tl=[spec, other],
                f=sorted(set(feats) | set(schema_features(other))),
            )
            call_id = f"functions.{name}:0"
            history = user + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "name": name,
                    "content": json.dumps(
                        {"status": "ok", "reference": f"R-{rng.randint(100, 999)}"}
                    ),
                },
            ]
            add(
                "after_result_call",
                multi + ["tool_result"],
                history + [{"role": "user", "content": "Good. Next: " + _ask(other, oargs)}],
                {"call": "must", "tools": [oname], "min_calls": 1, "args": {oname: oargs}},
            )
            add(
                "after_result_answer",
                multi + ["tool_result"],
                history
                + [
                    {
                        "role": "user",
                        "content": "What reference did that return? "
                        "Answer in one sentence, no tool.",
                    }
                ],
                {"call": "must_not"},
            )
    return cases


def write_suite(cases: list[dict[str, Any]], path: str) -> None:
    """Write cases as JSONL (one case per line, keys sorted so the file diffs cleanly)."""
    with open(path, "w") as f:
        for c in cases:
            f.write(json.dumps(c, sort_keys=True, ensure_ascii=False) + "\n")
