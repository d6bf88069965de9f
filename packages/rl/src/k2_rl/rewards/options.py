"""Options of the `math`, `code` and `instruction` rewards (import-light: pydantic only)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..sandbox.limits import SandboxLimits


class MathRewardOptions(BaseModel):
    """Options of the `math` reward."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    last_number_fallback: bool = Field(
        True,
        description="Without an answer marker (boxed, 'answer is', '####', 'Answer:'), "
        "take the last number of the response.",
    )
    use_math_verify: bool = Field(
        True, description="Check equivalence with math-verify (else sympy only)."
    )
    timeout_s: int = Field(5, ge=1, description="Seconds for one math-verify parse or check.")
    correct_score: float = Field(1.0, description="Score of a correct final answer.")
    wrong_score: float = Field(0.0, description="Score of a wrong final answer.")
    no_answer_score: float = Field(0.0, description="Score of a response with no final answer.")


class CodeRewardOptions(BaseModel):
    """Options of the `code` reward."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partial_credit: bool = Field(
        False, description="Score the fraction of tests passed instead of 1 only when all pass."
    )
    workers: int = Field(2, ge=1, le=64, description="Sandboxed runs at the same time.")
    require_fence: bool = Field(
        False,
        description="Only code inside ``` fences counts (else unfenced code that "
        "compiles is run too).",
    )
    sandbox: SandboxLimits = Field(
        default_factory=SandboxLimits, description="Limits and isolation of each run."
    )


class InstructionRewardOptions(BaseModel):
    """Options of the `instruction` reward."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    all_or_nothing: bool = Field(
        False, description="Score 1 only when every rule is met, else the fraction met."
    )
