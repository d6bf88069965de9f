"""`k2 eval-agent`: multi-turn tool-use episodes against the endpoint under test.

The synthesised tasks of `k2 synth-tools` (or the built-in ones) are played out: the simulated
user and the stateful tool environment of synth-tools (`ToolEnv`) answer the model under test,
then the rubric judge scores the transcript. Each episode is one item of the pipeline engine,
so a run is resumable and every episode is committed exactly once; an episode whose user,
tool or judge generator fails (transport) stays pending and is retried by the next run.

Outcomes, one per episode: `success` / `failure` (the judge's verdict), `unjudged` (the
judge's answer did not parse: neither pass nor fail), `turn_limit`, `token_limit`,
`time_limit` (a limit was hit before the user was satisfied), `endpoint_error` (the endpoint
refused a request, e.g. the context was exceeded), `user_ended_early`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .client import ChatClient
from .common import RoleGenerators
from .toolcall import ENVELOPE_MARKERS

OUTCOMES = (
    "success",
    "failure",
    "unjudged",
    "turn_limit",
    "token_limit",
    "time_limit",
    "endpoint_error",
    "user_ended_early",
)
TASKS_FILE = "agent_tasks.jsonl"


class AgentOptions(BaseModel):
    """Limits and sampling of `k2 eval-agent` episodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_turns: int = Field(8, gt=0, description="Answers of the model under test per episode.")
    max_tokens: int = Field(
        4096,
        gt=0,
        description="Completion tokens of the model under "
        "test per episode (the over-long-output limit).",
    )
    max_seconds: float = Field(
        300.0,
        gt=0,
        description="Wall-clock seconds per episode "
        "(simulated user and tools included, the judge not).",
    )
    max_tokens_per_turn: int = Field(512, gt=0, description="Completion limit per answer.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature of the model under test."
    )
    seed: int = Field(0, description="Seed of the sample, the personas and every request.")
    limit: int | None = Field(None, gt=0, description="A seed-stable sample of N tasks.")
    judge_threshold: float = Field(
        0.7, ge=0, le=1, description="Minimum judge score of a success (with passed=true)."
    )
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one request, seconds.")


class AgentSpec(BaseModel):
    """The agent of a task, as `k2 synth-tools` writes it."""

    model_config = ConfigDict(extra="allow")
    id: str = Field("agent", description="Agent id.")
    system_prompt: str = Field("", description="System prompt (empty: none).")
    tools: list[dict[str, Any]] = Field(..., min_length=1, description="OpenAI tool specs.")


class TaskSpec(BaseModel):
    """A task with its rubric, as `k2 synth-tools` writes it."""

    model_config = ConfigDict(extra="allow")
    description: str = Field(..., min_length=1, description="What the user wants done.")
    success_criteria: list[str] = Field(default_factory=list, description="Rubric criteria.")
    expected_tools: list[str] = Field(default_factory=list, description="Tools, in order.")
    checkpoints: list[str] = Field(default_factory=list, description="Intermediate checks.")


class TaskRecord(BaseModel):
    """One line of a tasks file (synth-tools' tasks stage output)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(..., min_length=1, description="Task id.")
    agent: AgentSpec = Field(..., description="The agent and its tools.")
    task: TaskSpec = Field(..., description="The task and its rubric.")


def load_tasks(path: str | None) -> list[dict[str, Any]]:
    """Task records of a JSONL file (None: the built-in tasks); ConfigError naming the file,
    line and field of the first bad one."""
    from k2_data.synth_tools import SpecError, validate_spec

    if path is None:
        text = resources.files("k2_rl.evaluation.agentic").joinpath("data", TASKS_FILE).read_text()
        where = f"builtin tasks ({TASKS_FILE})"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--tasks {path}: cannot read it ({e.strerror})") from None
        where = f"--tasks {path}"
    out, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} line {n}: not a JSON object")
        try:
            rec = TaskRecord.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "task"
            raise ConfigError(f"{where} line {n}: {loc}: {err['msg']}") from None
        for k, t in enumerate(rec.agent.tools):
            try:
                validate_spec(t)
            except SpecError as e:
                raise ConfigError(f"{where} line {n}: agent.tools.{k}: {e}") from None
        if rec.id in seen:
            raise ConfigError(f"{where} line {n}: id: {rec.id!r} repeats an earlier task")
        seen.add(rec.id)
        out.append(rec.model_dump(mode="json"))
    if not out:
        raise ConfigError(f"{where}: holds no tasks")
    return out


def sample_tasks(tasks: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A seed-stable sample: tasks ordered by sha256(seed:id), the first `limit` (a larger
    limit keeps the smaller sample's tasks)."""
    order = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}:{t['id']}".encode()).hexdigest())
    return order[:limit] if limit else order


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def classify_call(call: Any, specs: dict[str, Any]) -> str | None:
    """Why one tool call of an answer is invalid (None: valid)."""
    from jsonschema import Draft202012Validator

    fn = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(fn, dict)
        or not isinstance(fn.get("name"), str)
        or not isinstance(fn.get("arguments"), str)
    ):
        return "malformed_call"
    if fn["name"] not in specs:
        return "unknown_tool"
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return "args_invalid_json"
    schema = specs[fn["name"]]["function"].get("parameters") or {"type": "object"}
    if next(iter(Draft202012Validator(schema).iter_errors(args)), None) is not None:
        return "args_schema_invalid"
    return None


class _Transient(Exception):
    """The endpoint under test did not answer (connection, timeout, 5xx): retry the episode."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.error_kind = "endpoint_unavailable"


class EvalAgentStage:
    """The pipeline stage: one item per sampled task, one episode record per item."""

    name = "eval_agent"

    def __init__(
        self,
        tasks: list[dict[str, Any]],
        base_url: str,
        model: str,
        opts: AgentOptions,
        roles: dict[str, Any],
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
    ):
        self.tasks, self.base_url, self.model = tasks, base_url, model
        self.opts, self.roles, self.api_key_env = opts, roles, api_key_env
        self.concurrency = concurrency

    def identity(self) -> dict[str, Any]:
        """What decides the episodes: the model, the options, the simulators, the tasks."""
        blob = json.dumps(self.tasks, sort_keys=True).encode()
        return {
            "stage": self.name,
            "model": self.model,
            "options": self.opts.model_dump(),
            "roles": {k: v.identity() for k, v in self.roles.items()},
            "tasks_sha256": hashlib.sha256(blob).hexdigest(),
        }

    def items(self) -> list[dict[str, Any]]:
        """The sampled tasks."""
        return self.tasks

    def make_processor(self) -> EpisodeRunner:
        """An episode runner with this process's clients."""
        return EpisodeRunner(self)


class EpisodeRunner(RoleGenerators):
    """Plays one task: the model under test against the simulated user and tools, then the
    judge."""

    def __init__(self, stage: EvalAgentStage):
        from k2_data.synth_tools import prompts

        super().__init__(stage.roles)
        self.opts = stage.opts
        self.prompts = prompts
        self.client = ChatClient(
            stage.base_url,
            stage.model,
            api_key_env=stage.api_key_env,
            timeout_s=stage.opts.timeout_s,
            concurrency=stage.concurrency,
        )

    async def aclose(self) -> None:
        """Close the client and the generators."""
        await self.client.aclose()
        await super().aclose()

    async def _user(
        self, persona: str, task: dict[str, Any], messages: list[dict[str, Any]], seed: int
    ) -> str | None:
        convo = [m for m in messages if m["role"] != "system"]
        res = await self.gens["user"].chat(
            self.prompts.user_sim_messages(persona, task["description"], convo),
            temperature=0.0,
            max_tokens=256,
            seed=seed,
        )
        text = (res.message.get("content") or "").strip()
        return None if not text or self.prompts.DONE in text else text

    async def __call__(self, item: dict[str, Any]) -> Any:
        """One episode record (ItemResult with one record)."""
        from k2_data.pipeline import ItemResult

        t0 = time.monotonic()
        ep: dict[str, Any] = {
            "turns": 0,
            "tool_calls": 0,
            "invalid_calls": 0,
            "invalid_kinds": Counter(),
            "completion_tokens": 0,
            "prompt_tokens": 0,
            "tool_sim_errors": 0,
            "messages": [],
        }
        try:
            async with asyncio.timeout(self.opts.max_seconds):
                outcome = await self._play(item, ep)
        except TimeoutError:
            outcome = "time_limit"
        seconds = time.monotonic() - t0
        verdict, judge_raw = None, None
        if outcome == "finished":
            outcome, verdict, judge_raw = await self._judge(item, ep["messages"])
        rec = {
            "id": item["id"],
            "agent_id": item["agent"].get("id"),
            "outcome": outcome,
            "judge": verdict,
            "judge_raw": judge_raw,
            "task": item["task"],
            "persona": ep.get("persona"),
            "seconds": round(seconds, 3),
            **{
                k: ep[k]
                for k in (
                    "turns",
                    "tool_calls",
                    "invalid_calls",
                    "completion_tokens",
                    "prompt_tokens",
                    "tool_sim_errors",
                )
            },
            "invalid_kinds": dict(ep["invalid_kinds"]),
            "endpoint_error": ep.get("endpoint_error"),
            "messages": ep["messages"],
        }
        return ItemResult(records=[rec])

    async def _play(self, item: dict[str, Any], ep: dict[str, Any]) -> str:
        from k2_data.pipeline.jsonout import MalformedOutput
        from k2_data.synth_tools.stage import ToolEnv

        o, agent, task = self.opts, item["agent"], item["task"]
        seed = o.seed + _stable(item["id"]) % 1_000_000
        personas = self.prompts.PERSONAS
        ep["persona"] = persona = personas[_stable(f"{o.seed}:{item['id']}") % len(personas)]
        tools = agent["tools"]
        specs = {t["function"]["name"]: t for t in tools}
        env = ToolEnv(tools, {}, self.gens["tool"], seed)
        messages = ep["messages"]
        if agent.get("system_prompt"):
            messages.append({"role": "system", "content": agent["system_prompt"]})
        first = await self._user(persona, task, messages, seed)
        if first is None:
            return "user_ended_early"
        messages.append({"role": "user", "content": first})
        while True:
            if ep["turns"] >= o.max_turns:
                return "turn_limit"
            left = o.max_tokens - ep["completion_tokens"]
            body = {
                "messages": messages,
                "tools": tools,
                "temperature": o.temperature,
                "seed": seed + 100 + ep["turns"],
                "max_tokens": min(o.max_tokens_per_turn, left),
            }
            rep = await self.client.chat(body)
            if rep.error in ("connection", "timeout") or (
                rep.error == "http_error" and rep.detail.startswith("HTTP 5")
            ):
                raise _Transient(f"{rep.error}: {rep.detail}")
            if rep.error is not None:
                ep["endpoint_error"] = f"{rep.error}: {rep.detail}"[:300]
                return "endpoint_error"
            ep["turns"] += 1
            ep["completion_tokens"] += int(rep.usage.get("completion_tokens") or 0)
            ep["prompt_tokens"] += int(rep.usage.get("prompt_tokens") or 0)
            msg = rep.message or {}
            content = msg.get("content") if isinstance(msg.get("content"), str) else ""
            raw_calls = msg.get("tool_calls") or []
            calls = []
            for i, c in enumerate(raw_calls if isinstance(raw_calls, list) else [raw_calls]):
                ep["tool_calls"] += 1
                why = classify_call(c, specs)
                if why is not None:
                    ep["invalid_calls"] += 1
                    ep["invalid_kinds"][why] += 1
                if why != "malformed_call":
                    fn = c["function"]
                    calls.append(
                        {
                            "id": c.get("id") or f"functions.{fn['name']}:{i}",
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": fn["arguments"]},
                        }
                    )
            if not raw_calls and any(m in content for m in ENVELOPE_MARKERS):
                # a call the server did not parse: an invalid call the model meant to make
                ep["tool_calls"] += 1
                ep["invalid_calls"] += 1
                ep["invalid_kinds"]["envelope_in_content"] += 1
            out: dict[str, Any] = {"role": "assistant", "content": content or None}
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            if ep["completion_tokens"] >= o.max_tokens:
                return "token_limit"
            if calls:
                for c in calls:
                    try:
                        result = await env.call(c["function"]["name"], c["function"]["arguments"])
                    except MalformedOutput:
                        ep["tool_sim_errors"] += 1
                        result = json.dumps({"error": "the tool did not answer"})
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": c["id"],
                            "name": c["function"]["name"],
                            "content": result,
                        }
                    )
                continue
            reply = await self._user(persona, task, messages, seed + 200 + ep["turns"])
            if reply is None:
                return "finished"
            messages.append({"role": "user", "content": reply})

    async def _judge(
        self, item: dict[str, Any], messages: list[dict[str, Any]]
    ) -> tuple[str, dict[str, Any] | None, str | None]:
        from k2_data.pipeline.jsonout import MalformedOutput, extract_json

        res = await self.gens["judge"].chat(
            self.prompts.judge_messages(item["task"], messages),
            temperature=0.0,
            max_tokens=512,
            seed=self.opts.seed + _stable(item["id"]) % 1000,
        )
        raw = res.message.get("content") or ""
        try:
            v = extract_json(raw, ("score", "passed"))
            score, passed = float(v["score"]), v["passed"]
            if not isinstance(passed, bool):
                raise ValueError("passed is not a boolean")
        except (MalformedOutput, TypeError, ValueError):
            return "unjudged", None, raw[:1000]
        verdict = {"score": score, "passed": passed, "reasons": str(v.get("reasons", ""))[:500]}
        ok = passed and score >= self.opts.judge_threshold
        return ("success" if ok else "failure"), verdict, None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Success, calls, invalid calls, turns and tokens over the committed episodes."""
    n = len(records)
    outcomes = Counter(r["outcome"] for r in records)
    judged = outcomes["success"] + outcomes["failure"]
    calls = sum(r["tool_calls"] for r in records)
    invalid = sum(r["invalid_calls"] for r in records)
    kinds: Counter[str] = Counter()
    for r in records:
        kinds.update(r.get("invalid_kinds") or {})
    toks = sorted(r["completion_tokens"] for r in records)

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs) if xs else 0.0

    return {
        "episodes": n,
        "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
        "success_rate": outcomes["success"] / n if n else 0.0,
        "success_rate_judged": outcomes["success"] / judged if judged else None,
        "unjudged": outcomes["unjudged"],
        "calls_per_episode": calls / n if n else 0.0,
        "invalid_call_rate": invalid / calls if calls else 0.0,
        "invalid_kinds": dict(kinds),
        "turns_per_episode": mean([r["turns"] for r in records]),
        "tokens_per_episode": mean(toks),
        "tokens_per_episode_p50": toks[len(toks) // 2] if toks else 0,
        "tokens_per_episode_max": toks[-1] if toks else 0,
        "seconds_per_episode": mean([r["seconds"] for r in records]),
        "tool_sim_errors": sum(r.get("tool_sim_errors", 0) for r in records),
    }


def run_eval_agent(
    tasks: list[dict[str, Any]],
    base_url: str,
    model: str,
    opts: AgentOptions,
    roles: dict[str, Any],
    out: str | None = None,
    *,
    concurrency: int = 4,
    api_key_env: str = "OPENAI_API_KEY",
    shard_size: int = 4,
) -> dict[str, Any]:
    """Run (or resume) the episodes into `out` (None: runs/eval-agent/MODEL-HASH of the
    settings, so the same command resumes); the report over every committed episode."""
    import re

    from k2_data.pipeline import PipelineOptions, read_outputs, run_pipeline
    from k2_data.pipeline.engine import config_hash

    sample = sample_tasks(tasks, opts.limit, opts.seed)
    stage = EvalAgentStage(sample, base_url, model, opts, roles, api_key_env, concurrency)
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)[:40]
        out = f"runs/eval-agent/{slug}-{config_hash(stage.identity())}"
    popts = PipelineOptions(
        out=out,
        shard_size=shard_size,
        concurrency=concurrency,
        tracking=False,
        progress=sys.stderr.isatty(),
    )
    s = run_pipeline(stage, popts)
    records = sorted(read_outputs(out), key=lambda r: r["id"])
    return {
        "command": "eval-agent",
        "base_url": base_url,
        "model": model,
        "out": out,
        "options": opts.model_dump(),
        "roles": {k: v.identity() for k, v in roles.items()},
        "complete": s.complete,
        "pending": s.failed,
        "errors": s.errors,
        "episodes_this_run": s.items_this_run,
        "seconds": round(s.seconds, 3),
        **summarize(records),
        "sample_ids": [t["id"] for t in sample],
    }


def format_report(rep: dict[str, Any]) -> str:
    """The report as terminal lines."""

    def rate(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"eval-agent {rep['model']} @ {rep['base_url']}: {rep['episodes']} episodes "
        f"({rep['episodes_this_run']} this run, {rep['seconds']:.1f} s) in {rep['out']}",
        f"task success {rate(rep['success_rate'])} of all episodes, "
        f"{rate(rep['success_rate_judged'])} of judged ones; unjudged {rep['unjudged']}",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in rep["outcomes"].items()),
        f"calls/episode {rep['calls_per_episode']:.2f}, invalid-call rate "
        f"{rep['invalid_call_rate']:.3f} "
        f"({', '.join(f'{k} {v}' for k, v in rep['invalid_kinds'].items()) or 'none'})",
        f"turns/episode {rep['turns_per_episode']:.2f}, tokens/episode mean "
        f"{rep['tokens_per_episode']:.1f} p50 {rep['tokens_per_episode_p50']} max "
        f"{rep['tokens_per_episode_max']}, tool simulator errors {rep['tool_sim_errors']}",
    ]
    if not rep["complete"]:
        lines.append(
            f"incomplete: {rep['pending']} episodes pending "
            f"({(rep['errors'] or ['?'])[0]}); rerun the same command to resume"
        )
    return "\n".join(lines)
