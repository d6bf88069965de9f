"""`k2 synth-tools` end to end: tool specs -> tools.json -> agents.json -> tasks ->
trajectories, each stage its own resumable pipeline run under the output root."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..pipeline.engine import RunSummary, run_pipeline
from ..pipeline.store import ShardStore
from .config import SynthToolsConfig
from .specs import load_real_tools, spec_key
from .stage import TaskStage, ToolSpecStage, TrajectoryStage


@dataclass
class SynthToolsSummary:
    """The stages' summaries, tool counts, and whether the dataset is complete."""

    stages: dict[str, RunSummary]
    tools: dict[str, Any]
    complete: bool
    dataset: str

    def line(self) -> str:
        """One line per stage, plus the tool counts and where the dataset is."""
        lines = [f"{name}: {s.line()}" for name, s in self.stages.items()]
        t = self.tools
        if t:
            lines.append(
                f"tools: {t['n_tools']} kept ({t['n_real']} real), {t['duplicates']} "
                f"duplicates, invalid: {t['invalid'] or 'none'}; {t['n_agents']} agents"
            )
        lines.append(
            f"SFT dataset: {self.dataset}"
            if self.complete
            else "incomplete: rerun to retry the failed items"
        )
        return "\n".join(lines)


def _sub(cfg: SynthToolsConfig, stage: str) -> Any:
    p = cfg.pipeline
    return p.model_copy(
        update={"out": f"{p.out.rstrip('/')}/{stage}", "experiment": f"{p.experiment}-tools"}
    )


def collect_tools(cfg: SynthToolsConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Valid specs deduplicated (first by id wins), invalid counted by reason, real tools
    added, and agents: one per sub-domain (its tools, up to max_tools_per_agent) plus one
    holding the real tools."""
    invalid: Counter[str] = Counter()
    seen: set[str] = set()
    dups = 0
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["id"]):
        if not r.get("valid"):
            invalid[r.get("error", "invalid")] += 1
            continue
        key = spec_key(r["spec"])
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        groups.setdefault((r["domain"], r["subdomain"]), []).append(r["spec"])
    real = [t.spec for t in load_real_tools(cfg.real_tools) if spec_key(t.spec) not in seen]
    agents = []
    for (dom, sub), specs in groups.items():
        agents.append(
            {
                "id": f"agent-{len(agents):04d}",
                "domain": dom,
                "subdomain": sub,
                "system_prompt": f"You are an assistant for {sub} ({dom}). Use the "
                "tools to do what the user asks, ask for details you are missing, and "
                "say what you did.",
                "tools": specs[: cfg.max_tools_per_agent],
            }
        )
    if real:
        agents.append(
            {
                "id": f"agent-{len(agents):04d}",
                "domain": "real",
                "subdomain": "real",
                "system_prompt": "You are a helpful assistant. Use the tools to do what "
                "the user asks and report the results.",
                "tools": real[: cfg.max_tools_per_agent],
            }
        )
    if cfg.max_agents is not None:
        agents = agents[: cfg.max_agents]
    n_tools = sum(len(g) for g in groups.values()) + len(real)
    return {
        "n_tools": n_tools,
        "n_real": len(real),
        "duplicates": dups,
        "invalid": dict(invalid),
        "n_agents": len(agents),
        "agents": agents,
    }


def run_synth_tools(cfg: SynthToolsConfig) -> SynthToolsSummary:
    """Run (or resume) every stage; stops after a stage that is incomplete."""
    stages: dict[str, RunSummary] = {}
    load_real_tools(cfg.real_tools)  # a bad import path fails before any work
    root = ShardStore(cfg.pipeline.out)
    s1 = run_pipeline(ToolSpecStage(cfg), _sub(cfg, "tools"))
    stages["tools"] = s1
    if not s1.complete:
        return SynthToolsSummary(stages, {}, False, "")
    tools = collect_tools(cfg, ShardStore(_sub(cfg, "tools").out).read_records())
    root.write_json("agents.json", tools)
    s2 = run_pipeline(TaskStage(cfg, tools["agents"]), _sub(cfg, "tasks"))
    stages["tasks"] = s2
    if not s2.complete:
        return SynthToolsSummary(stages, tools, False, "")
    tasks = sorted(ShardStore(_sub(cfg, "tasks").out).read_records(), key=lambda r: r["id"])
    s3 = run_pipeline(TrajectoryStage(cfg, tasks), _sub(cfg, "trajectories"))
    stages["trajectories"] = s3
    data = root.uri("trajectories", "data") + f"/*.{cfg.pipeline.format}"
    return SynthToolsSummary(stages, tools, s3.complete, data)
