"""The `math` reward: the response's final answer against the record's `answer`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .answer import answers_equal, extract_answer
from .base import Reward, RewardResult, require
from .options import MathRewardOptions


class MathReward(Reward):
    """Extract the final answer (boxed, '#### x', 'Answer: x', ...) and check equivalence."""

    name = "math"

    def __init__(self, options: MathRewardOptions | None = None):
        self.options = options or MathRewardOptions()

    def score(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[RewardResult]:
        """Score each response's final answer against `prompt['answer']`."""
        gold = str(require(prompt, "answer", self.name)).strip()
        o = self.options
        out = []
        for text in responses:
            got = extract_answer(text, last_number=o.last_number_fallback)
            if got is None:
                out.append(RewardResult(o.no_answer_score, "no_answer", detail="no final answer"))
            elif answers_equal(gold, got, use_math_verify=o.use_math_verify, timeout_s=o.timeout_s):
                out.append(RewardResult(o.correct_score, "pass", detail=got))
            else:
                out.append(RewardResult(o.wrong_score, "wrong", detail=f"{got} != {gold}"))
        return out


def build_math_reward(*, options: MathRewardOptions) -> MathReward:
    """Final-answer extraction and equivalence with math-verify, falling back to sympy."""
    return MathReward(options)
