"""The `instruction` reward: the fraction of the record's rules that a response meets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import Reward, RewardResult, require
from .options import InstructionRewardOptions
from .rules import parse_rules


class InstructionReward(Reward):
    """Check each response against the record's `rules` (length, format, keywords, JSON, ...)."""

    name = "instruction"

    def __init__(self, options: InstructionRewardOptions | None = None):
        self.options = options or InstructionRewardOptions()

    def score(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[RewardResult]:
        """Score = fraction of rules met (1/0 when all_or_nothing); outcome pass/partial/fail."""
        rules = parse_rules(require(prompt, "rules", self.name))
        out = []
        for text in responses:
            failed = [f"{r.kind}: {why}" for r in rules for ok, why in [r.check(text)] if not ok]
            met = len(rules) - len(failed)
            frac = met / len(rules) if rules else 1.0
            score = float(not failed) if self.options.all_or_nothing else frac
            outcome = "pass" if not failed else ("partial" if met else "fail")
            out.append(RewardResult(score, outcome, detail="; ".join(failed)))
        return out


def build_instruction_reward(*, options: InstructionRewardOptions) -> InstructionReward:
    """Rule checks: length, format, keywords, JSON validity and language."""
    return InstructionReward(options)
