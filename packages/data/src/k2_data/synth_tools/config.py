"""The config of `k2 synth-tools`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..pipeline.options import GeneratorSpec, PipelineOptions


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolSamplingConfig(_Model):
    """Sampling of the synthesis calls."""

    temperature: float = Field(
        0.7,
        ge=0,
        description="Temperature of generation calls (judge and tool simulator run at 0).",
    )
    max_tokens: int = Field(1024, gt=0, description="Token limit per call.")
    seed: int = Field(0, description="Base seed; each call adds a stable offset.")


class SynthToolsConfig(_Model):
    """Everything `k2 synth-tools` needs."""

    seed_domains: list[str] = Field(
        default_factory=lambda: ["travel booking", "personal finance", "clinic scheduling"],
        description="Seed domains grown into sub-domains and then tools.",
    )
    n_subdomains: int = Field(3, gt=0, description="Sub-domains asked for per seed domain.")
    tools_per_subdomain: int = Field(4, gt=0, description="Tools asked for per sub-domain.")
    real_tools: list[str] = Field(
        default_factory=list,
        description="`module:function` paths of real Python tools "
        "(typed functions; see k2_data.synth_tools.tool), executed for real.",
    )
    max_tools_per_agent: int = Field(6, gt=0, description="Tools given to one agent at most.")
    max_agents: int | None = Field(
        None,
        gt=0,
        description="Agents at most (None: one per sub-domain, plus one for the real tools).",
    )
    tasks_per_agent: int = Field(2, gt=0, description="Tasks asked for per agent.")
    max_turns: int = Field(8, gt=0, description="Assistant turns per trajectory at most.")
    personas: list[str] | None = Field(None, description="User personas; None: built-in ones.")
    judge_threshold: float = Field(
        0.7, ge=0, le=1, description="Minimum judge score (and passed=true)."
    )
    generator: GeneratorSpec = Field(
        default_factory=GeneratorSpec, description="The model of every role unless overridden."
    )
    designer_generator: GeneratorSpec | None = Field(
        None,
        description="The model that grows tool specs and writes tasks (None: generator); "
        "e.g. a strong hosted model designing data for a small policy acting as the agent.",
    )
    user_generator: GeneratorSpec | None = Field(None, description="The user simulator's model.")
    tool_generator: GeneratorSpec | None = Field(None, description="The tool simulator's model.")
    judge_generator: GeneratorSpec | None = Field(None, description="The judge's model.")
    sampling: ToolSamplingConfig = Field(
        default_factory=ToolSamplingConfig, description="Sampling settings."
    )
    pipeline: PipelineOptions = Field(
        ...,
        description="Output root (stages write tools/, "
        "tasks/, trajectories/ inside it), sharding, executor.",
    )
