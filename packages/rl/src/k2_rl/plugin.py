"""Plugin hooks of k2_rl: its commands and implementations, registered import-light (each
factory imports its module when called)."""

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


def eval_command(*, options: Any) -> Any:
    """Evaluate a checkpoint offline: perplexity, arithmetic, knowledge_qa, code."""
    from .evaluation.commands import eval_command as impl

    return impl(options=options)


def lm_eval_command(*, options: Any) -> Any:
    """lm-evaluation-harness with the `k2` model type registered."""
    from .evaluation.commands import lm_eval_command as impl

    return impl(options=options)


def experiment_command(*, options: Any) -> Any:
    """Run a design experiment (sparsity, heads, rephrase, qk_clip, muon_vs_adamw)."""
    from .experiments.commands import experiment_command as impl

    return impl(options=options)


def math_reward(*, options: MathRewardOptions) -> Any:
    """Final-answer extraction and equivalence with math-verify, falling back to sympy."""
    from .rewards.math_reward import build_math_reward

    return build_math_reward(options=options)


def code_reward(*, options: CodeRewardOptions) -> Any:
    """Model-written Python run against test cases in the sandbox; sandbox errors excluded."""
    from .rewards.code_reward import build_code_reward

    return build_code_reward(options=options)


def instruction_reward(*, options: InstructionRewardOptions) -> Any:
    """Rule checks: length, format, keywords, JSON validity and language."""
    from .rewards.instruction_reward import build_instruction_reward

    return build_instruction_reward(options=options)


# --- SFT / RL (k2 sft, k2 rl, k2 rl-demo) ----------------------------------------------------

def sft_command(*, options: Any) -> Any:
    """Supervised fine-tuning of a k2 checkpoint on chat data (loss on assistant tokens)."""
    from .commands import sft_command as impl

    return impl(options=options)


def rl_command(*, options: Any) -> Any:
    """RL with the K1.5 objective: rollouts, verifiable rewards, partial rollout, MuonClip."""
    from .commands import rl_command as impl

    return impl(options=options)


def rl_demo_command(*, options: Any) -> Any:
    """The post-training demonstration: pretrain -> sft -> rl on arithmetic (+ a code run)."""
    from .commands import demo_command as impl

    return impl(options=options)


def sft_stage(*, options: Any) -> Any:
    """Supervised fine-tuning from `plugins.sft.init` on the `data` section (e.g. `chat`)."""
    from .sft import build_sft_stage

    return build_sft_stage(options=options)


def rl_stage(*, options: Any) -> Any:
    """RL from `plugins.rl.init`: engine rollouts, rewards, K1.5 objective, weight sync."""
    from .rl_stage import build_rl_stage

    return build_rl_stage(options=options)


def chat_dataset(**kwargs: Any) -> Any:
    """Chat conversations (JSONL/Parquet or built-in worked math) packed, assistant-only labels."""
    from .chat_data import build_chat

    return build_chat(**kwargs)


def k15_algorithm(*, options: Any) -> Any:
    """The Kimi k1.5 / K2 objective: (r - mean r - tau * log(pi/pi_old))^2 on response tokens."""
    from .objective import build_k15

    return build_k15(options=options)


def rubric_critic_reward(*, options: Any) -> Any:
    """Self-critique rubric reward: a critic compares the K responses pairwise against rubrics."""
    from .critic import build_rubric_critic

    return build_rubric_critic(options=options)


# --- agentic and safety evaluation (k2 eval-toolcall, k2 eval-agent, k2 redteam) -----------

def eval_toolcall_command(*, options: Any) -> Any:
    """Tool-call conformance of any OpenAI-compatible endpoint."""
    from .evaluation.agentic.commands import eval_toolcall_command as impl

    return impl(options=options)


def eval_agent_command(*, options: Any) -> Any:
    """Multi-turn tool-use episodes against any OpenAI-compatible endpoint."""
    from .evaluation.agentic.commands import eval_agent_command as impl

    return impl(options=options)


def redteam_command(*, options: Any) -> Any:
    """Red-team any OpenAI-compatible endpoint: plugins x strategies, judged by a rubric."""
    from .evaluation.agentic.commands import redteam_command as impl

    return impl(options=options)


@hookimpl
def k2_register(registry: Any) -> None:
    """Register k2-rl's commands and implementations."""
    registry.register("command", "eval", eval_command)
    registry.register("command", "experiment", experiment_command)
    registry.register("command", "lm-eval", lm_eval_command)
    registry.register("reward", "math", math_reward, MathRewardOptions)
    registry.register("reward", "code", code_reward, CodeRewardOptions)
    registry.register("reward", "instruction", instruction_reward, InstructionRewardOptions)
    registry.register("command", "sft", sft_command)
    registry.register("command", "rl", rl_command)
    registry.register("command", "rl-demo", rl_demo_command)
    registry.register("stage", "sft", sft_stage)
    registry.register("stage", "rl", rl_stage)
    registry.register("dataset", "chat", chat_dataset, ChatDataOptions)
    registry.register("rl_algorithm", "k15", k15_algorithm, K15Options)
    registry.register("reward", "rubric_critic", rubric_critic_reward, RubricCriticOptions)
    registry.register_section("sft", SftOptions)
    registry.register_section("rl", RlOptions)
    registry.register("command", "eval-toolcall", eval_toolcall_command)
    registry.register("command", "eval-agent", eval_agent_command)
    registry.register("command", "redteam", redteam_command)
