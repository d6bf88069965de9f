"""Agentic tool-use synthesis (`k2 synth-tools`): tool specs grown by domain evolution, real
Python tools, agents, tasks with rubrics, judged multi-turn trajectories."""

from .config import SynthToolsConfig, ToolSamplingConfig
from .specs import RealTool, SpecError, real_tools, tool, validate_spec

__all__ = [
    "RealTool",
    "SpecError",
    "SynthToolsConfig",
    "ToolSamplingConfig",
    "real_tools",
    "tool",
    "validate_spec",
    "run_synth_tools",
]


def run_synth_tools(cfg: SynthToolsConfig):  # noqa: ANN201 - SynthToolsSummary, lazy import
    """Run (or resume) every stage of `cfg`; its SynthToolsSummary."""
    from .run import run_synth_tools as impl

    return impl(cfg)
