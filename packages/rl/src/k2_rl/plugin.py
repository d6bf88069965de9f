"""Plugin hooks of k2_rl: its commands and implementations, registered import-light (each
factory a `"module:attr"` reference, imported on first build)."""

from __future__ import annotations

from typing import Any

from k2_core.hookspecs import hookimpl

from .options import (
    ChatDataOptions,
    K15Options,
    RlOptions,
    RubricCriticOptions,
    SftOptions,
)
from .rewards.options import CodeRewardOptions, InstructionRewardOptions, MathRewardOptions


@hookimpl
def k2_register(registry: Any) -> None:
    """Register k2-rl's commands and implementations."""
    agentic = "k2_rl.evaluation.agentic.commands"
    registry.register("command", "eval", "k2_rl.evaluation.commands:eval_command")
    registry.register("command", "experiment", "k2_rl.experiments.commands:experiment_command")
    registry.register(
        "command",
        "lm-eval",
        "k2_rl.evaluation.commands:lm_eval_command",
        doc="lm-evaluation-harness with the `k2` model type registered.",
    )
    registry.register(
        "reward", "math", "k2_rl.rewards.math_reward:build_math_reward", MathRewardOptions
    )
    registry.register(
        "reward", "code", "k2_rl.rewards.code_reward:build_code_reward", CodeRewardOptions
    )
    registry.register(
        "reward",
        "instruction",
        "k2_rl.rewards.instruction_reward:build_instruction_reward",
        InstructionRewardOptions,
    )
    registry.register("command", "sft", "k2_rl.commands:sft_command")
    registry.register("command", "rl", "k2_rl.commands:rl_command")
    registry.register("command", "rl-demo", "k2_rl.commands:demo_command")
    registry.register(
        "stage",
        "sft",
        "k2_rl.sft:build_sft_stage",
        doc="Supervised fine-tuning from `plugins.sft.init` on the `data` section (e.g. `chat`).",
    )
    registry.register(
        "stage",
        "rl",
        "k2_rl.rl_stage:build_rl_stage",
        doc="RL from `plugins.rl.init`: engine rollouts, rewards, K1.5 objective, weight sync.",
    )
    registry.register(
        "dataset",
        "chat",
        "k2_rl.chat_data:build_chat",
        ChatDataOptions,
        doc="Chat conversations (JSONL/Parquet or built-in worked math) packed, "
        "assistant-only labels.",
    )
    registry.register("rl_algorithm", "k15", "k2_rl.objective:build_k15", K15Options)
    registry.register(
        "reward",
        "rubric_critic",
        "k2_rl.critic:build_rubric_critic",
        RubricCriticOptions,
        doc="Self-critique rubric reward: a critic compares "
        "the K responses pairwise against rubrics.",
    )
    registry.register_section("sft", SftOptions)
    registry.register_section("rl", RlOptions)
    registry.register("command", "eval-toolcall", f"{agentic}:eval_toolcall_command")
    registry.register("command", "eval-agent", f"{agentic}:eval_agent_command")
    registry.register("command", "redteam", f"{agentic}:redteam_command")
