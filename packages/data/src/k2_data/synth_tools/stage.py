"""The three stages of tool-use synthesis: tool specs by domain evolution, tasks with rubrics per
agent, and judged multi-turn trajectories against a simulated (or real) tool environment."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from ..pipeline.engine import ItemResult
from ..pipeline.jsonout import MalformedOutput, extract_json
from ..pipeline.options import GeneratorSpec, build_generator
from . import prompts
from .config import SynthToolsConfig
from .specs import SpecError, call_real, check_arguments, load_real_tools, validate_spec


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def slug(text: str) -> str:
    """A lowercase identifier for ids."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "x"


class _Roles:
    """The generators of each role; one instance per distinct spec."""

    def __init__(self, cfg: SynthToolsConfig):
        made: dict[str, Any] = {}

        def get(spec: GeneratorSpec | None, where: str) -> Any:
            spec = spec or cfg.generator
            key = spec.model_dump_json()
            if key not in made:
                made[key] = build_generator(spec, where)
            return made[key]

        self.agent = get(cfg.generator, "generator")
        self.designer = get(cfg.designer_generator, "designer_generator")
        self.user = get(cfg.user_generator, "user_generator")
        self.tool = get(cfg.tool_generator, "tool_generator")
        self.judge = get(cfg.judge_generator, "judge_generator")
        self._all = list(made.values())

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self._all:
            for k, v in dict(getattr(g, "usage", {})).items():
                out[k] = out.get(k, 0) + int(v)
        return out

    async def aclose(self) -> None:
        for g in self._all:
            await g.aclose()


def _content(res: Any) -> str:
    return (res.message.get("content") or "").strip()


class _Base:
    fields: tuple[str, ...] = ()  # the config fields that decide this stage's outputs

    def __init__(self, cfg: SynthToolsConfig):
        self.cfg = cfg

    def _ident(self) -> dict[str, Any]:
        """This stage's fields only: changing a later stage's setting keeps earlier outputs."""
        d: dict[str, Any] = {"stage": self.name}  # type: ignore[attr-defined]
        for k in self.fields:
            v = getattr(self.cfg, k)
            if isinstance(v, GeneratorSpec):
                d[k] = v.identity()
            elif k.endswith("_generator"):  # unset: the main generator plays the role
                d[k] = (v or self.cfg.generator).identity()
            else:
                d[k] = v.model_dump(mode="json") if hasattr(v, "model_dump") else v
        return d


# -- stage 1: tool specs ----------------------------------------------------------------


class ToolSpecStage(_Base):
    """Seed domain -> sub-domains -> tool specs (valid and invalid, checked later)."""

    name = "tool_specs"
    fields = (
        "seed_domains",
        "n_subdomains",
        "tools_per_subdomain",
        "designer_generator",
        "sampling",
    )

    def identity(self) -> dict[str, Any]:
        """The settings that decide the specs."""
        return self._ident()

    def items(self) -> Iterator[dict[str, Any]]:
        """One item per seed domain."""
        for i, d in enumerate(self.cfg.seed_domains):
            yield {"id": f"{i:03d}-{slug(d)}", "domain": d}

    def make_processor(self) -> ToolSpecProcessor:
        """A processor with this process's generators."""
        return ToolSpecProcessor(self.cfg)


class _Proc:
    def __init__(self, cfg: SynthToolsConfig):
        self.cfg = cfg
        self.roles = _Roles(cfg)

    def _seed(self, key: str) -> int:
        return self.cfg.sampling.seed + _stable(key) % 1_000_000

    def stats(self) -> dict[str, int]:
        """Generator usage of every role."""
        return self.roles.stats()

    async def aclose(self) -> None:
        """Close the generators."""
        await self.roles.aclose()


class ToolSpecProcessor(_Proc):
    """Grows one seed domain into tool specs."""

    async def __call__(self, item: dict[str, Any]) -> ItemResult:
        """Sub-domains, then tools per sub-domain."""
        cfg, gen, dom = self.cfg, self.roles.designer, item["domain"]
        res = await gen.chat(
            prompts.subdomain_messages(dom, cfg.n_subdomains),
            temperature=cfg.sampling.temperature,
            max_tokens=cfg.sampling.max_tokens,
            seed=self._seed(item["id"]),
        )
        subs = extract_json(_content(res), ("subdomains",))["subdomains"]
        subs = (
            [s for s in subs if isinstance(s, str) and s.strip()][: cfg.n_subdomains]
            if isinstance(subs, list)
            else []
        )
        if not subs:
            return ItemResult(rejected="no_subdomains")

        async def grow(sub: str) -> list[dict[str, Any]]:
            r = await gen.chat(
                prompts.tools_messages(dom, sub, cfg.tools_per_subdomain),
                temperature=cfg.sampling.temperature,
                max_tokens=cfg.sampling.max_tokens,
                seed=self._seed(f"{item['id']}/{sub}"),
            )
            raw = extract_json(_content(r), ("tools",))["tools"]
            out = []
            for k, spec in enumerate(raw if isinstance(raw, list) else []):
                rec: dict[str, Any] = {
                    "id": f"{item['id']}/{slug(sub)}/{k:02d}",
                    "domain": dom,
                    "subdomain": sub,
                }
                try:
                    rec.update(valid=True, spec=validate_spec(spec))
                except SpecError as e:
                    rec.update(valid=False, error=e.reason, raw=json.dumps(spec)[:2000])
                out.append(rec)
            return out

        groups = await asyncio.gather(*(grow(s) for s in subs))
        return ItemResult(records=[r for g in groups for r in g])


# -- stage 2: tasks ---------------------------------------------------------------------


def _str_list(v: Any) -> list[str]:
    return [str(x) for x in v if isinstance(x, str | int | float)] if isinstance(v, list) else []


class TaskStage(_Base):
    """One item per agent: tasks with rubrics for its tools."""

    name = "tasks"
    fields = ("tasks_per_agent", "designer_generator", "sampling")

    def __init__(self, cfg: SynthToolsConfig, agents: list[dict[str, Any]]):
        super().__init__(cfg)
        self.agents = agents

    def identity(self) -> dict[str, Any]:
        """The settings and the agents (hashed)."""
        blob = json.dumps(self.agents, sort_keys=True).encode()
        return {**self._ident(), "agents_sha256": hashlib.sha256(blob).hexdigest()}

    def items(self) -> Iterator[dict[str, Any]]:
        """The agents."""
        yield from self.agents

    def make_processor(self) -> TaskProcessor:
        """A processor with this process's generators."""
        return TaskProcessor(self.cfg)


class TaskProcessor(_Proc):
    """Asks for tasks with rubrics for one agent."""

    async def __call__(self, agent: dict[str, Any]) -> ItemResult:
        """Validated tasks: a description, criteria, expected tools among the agent's."""
        cfg = self.cfg
        res = await self.roles.designer.chat(
            prompts.tasks_messages(agent, cfg.tasks_per_agent),
            temperature=cfg.sampling.temperature,
            max_tokens=cfg.sampling.max_tokens,
            seed=self._seed(agent["id"]),
        )
        raw = extract_json(_content(res), ("tasks",))["tasks"]
        names = {t["function"]["name"] for t in agent["tools"]}
        out = []
        for j, t in enumerate(raw if isinstance(raw, list) else []):
            if (
                not isinstance(t, dict)
                or not isinstance(t.get("description"), str)
                or not t["description"].strip()
            ):
                continue
            task = {
                "description": t["description"].strip(),
                "success_criteria": _str_list(t.get("success_criteria")),
                "expected_tools": [n for n in _str_list(t.get("expected_tools")) if n in names],
                "checkpoints": _str_list(t.get("checkpoints")),
            }
            out.append({"id": f"{agent['id']}/task-{j:02d}", "agent": agent, "task": task})
            if len(out) == cfg.tasks_per_agent:
                break
        return ItemResult(records=out) if out else ItemResult(rejected="no_tasks")


# -- stage 3: trajectories --------------------------------------------------------------


class TrajectoryStage(_Base):
    """One item per task: a simulated conversation, judged against the rubric."""

    name = "trajectories"
    fields = (
        "real_tools",
        "max_turns",
        "personas",
        "judge_threshold",
        "generator",
        "user_generator",
        "tool_generator",
        "judge_generator",
        "sampling",
    )

    def __init__(self, cfg: SynthToolsConfig, tasks: list[dict[str, Any]] | None = None):
        super().__init__(cfg)
        self.tasks = tasks or []

    def identity(self) -> dict[str, Any]:
        """The settings and the tasks (hashed)."""
        blob = json.dumps(self.tasks, sort_keys=True).encode()
        return {**self._ident(), "tasks_sha256": hashlib.sha256(blob).hexdigest()}

    def items(self) -> Iterator[dict[str, Any]]:
        """The tasks."""
        yield from self.tasks

    def make_processor(self) -> TrajectoryProcessor:
        """A processor with this process's generators and real tools."""
        return TrajectoryProcessor(self.cfg)


class ToolEnv:
    """The tool environment of one trajectory: real tools run, the others are simulated by
    the world model, which sees and updates a state kept across calls."""

    def __init__(self, tools: list[dict[str, Any]], real: dict[str, Any], world: Any, seed: int):
        self.specs = {t["function"]["name"]: t for t in tools}
        self.real, self.world, self.seed = real, world, seed
        self.state: dict[str, Any] = {}
        self.calls = 0
        self.kinds: set[str] = set()

    async def call(self, name: str, arguments: str) -> str:
        """The tool message content of one call."""
        self.calls += 1
        spec = self.specs.get(name)
        if spec is None:
            return json.dumps({"error": f"unknown tool {name!r}"})
        try:
            args = json.loads(arguments or "{}")
        except ValueError:
            return json.dumps({"error": "arguments are not valid JSON"})
        bad = check_arguments(spec, args)
        if bad is not None:
            return json.dumps({"error": f"invalid arguments: {bad}"})
        if name in self.real:
            self.kinds.add("real")
            return await asyncio.to_thread(call_real, self.real[name], args)
        self.kinds.add("simulated")
        res = await self.world.chat(
            prompts.tool_sim_messages(spec, args, self.state),
            temperature=0.0,
            max_tokens=1024,
            seed=self.seed + self.calls,
        )
        obj = extract_json(_content(res), ("result",))
        if isinstance(obj.get("state"), dict):
            self.state = obj["state"]
        return json.dumps(obj["result"], ensure_ascii=False)


class TrajectoryProcessor(_Proc):
    """Runs one conversation between the agent, the simulated user and the tool environment."""

    def __init__(self, cfg: SynthToolsConfig):
        super().__init__(cfg)
        self.real = {t.name: t for t in load_real_tools(cfg.real_tools)}
        self.personas = list(cfg.personas or prompts.PERSONAS)

    async def __call__(self, item: dict[str, Any]) -> ItemResult:
        """A judged trajectory record, or why it was rejected."""
        cfg, agent, task = self.cfg, item["agent"], item["task"]
        seed = self._seed(item["id"])
        persona = self.personas[_stable(item["id"]) % len(self.personas)]
        env = ToolEnv(agent["tools"], self.real, self.roles.tool, seed)
        messages: list[dict[str, Any]] = [{"role": "system", "content": agent["system_prompt"]}]
        first = await self._user_turn(persona, task, messages, seed)
        if first is None:
            return ItemResult(rejected="user_ended_early")
        messages.append({"role": "user", "content": first})
        finished = False
        for turn in range(cfg.max_turns):
            res = await self.roles.agent.chat(
                messages,
                tools=agent["tools"],
                temperature=cfg.sampling.temperature,
                max_tokens=cfg.sampling.max_tokens,
                seed=seed + 100 + turn,
            )
            msg = dict(res.message)
            calls = msg.get("tool_calls") or []
            for i, c in enumerate(calls):  # K2's id form when the server gave none
                c.setdefault("id", f"functions.{c['function']['name']}:{i}")
                c.setdefault("type", "function")
            messages.append(msg)
            if calls:
                for c in calls:
                    content = await env.call(c["function"]["name"], c["function"]["arguments"])
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": c["id"],
                            "name": c["function"]["name"],
                            "content": content,
                        }
                    )
                continue
            reply = await self._user_turn(persona, task, messages, seed + 200 + turn)
            if reply is None:
                finished = True
                break
            messages.append({"role": "user", "content": reply})
        if not finished:
            return ItemResult(rejected="max_turns")
        if env.calls == 0 and task["expected_tools"]:
            return ItemResult(rejected="no_tool_calls")
        res = await self.roles.judge.chat(
            prompts.judge_messages(task, messages), temperature=0.0, max_tokens=512, seed=seed
        )
        v = extract_json(_content(res), ("score", "passed"))
        try:
            verdict = {
                "score": float(v["score"]),
                "passed": bool(v["passed"]),
                "reasons": str(v.get("reasons", ""))[:500],
            }
        except (TypeError, ValueError):
            raise MalformedOutput("judge score is not a number") from None
        if not verdict["passed"] or verdict["score"] < cfg.judge_threshold:
            return ItemResult(rejected="judge_failed")
        env_kind = "+".join(sorted(env.kinds)) or "none"
        gen = getattr(self.roles.agent, "describe", None)
        return ItemResult(
            records=[
                {
                    "id": item["id"],
                    "messages": messages,
                    "tools": agent["tools"],
                    "provenance": {
                        "agent_id": agent["id"],
                        "domain": agent.get("domain"),
                        "subdomain": agent.get("subdomain"),
                        "task": task,
                        "persona": persona,
                        "tool_env": env_kind,
                        "tool_calls": env.calls,
                        "generator": gen() if callable(gen) else cfg.generator.name,
                    },
                    "judge": verdict,
                }
            ]
        )

    async def _user_turn(
        self, persona: str, task: dict[str, Any], messages: list[dict[str, Any]], seed: int
    ) -> str | None:
        res = await self.roles.user.chat(
            prompts.user_sim_messages(persona, task["description"], messages[1:]),
            temperature=self.cfg.sampling.temperature,
            max_tokens=512,
            seed=seed,
        )
        text = _content(res)
        return None if not text or prompts.DONE in text else text
