"""The reward interface: score K responses to one task record at once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k2_core.errors import ConfigError


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response.

    `excluded` marks an infrastructure failure (e.g. the sandbox could not run the code): the
    RL loop leaves such a response out of the advantage and counts it, never scores it wrong.
    """

    score: float
    outcome: str
    excluded: bool = False
    detail: str = ""


class Reward(ABC):
    """A verifiable reward: `score(prompt, responses)` returns one RewardResult per response."""

    name: str = ""

    @abstractmethod
    def score(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[RewardResult]:
        """Score every response to the task record `prompt` (batched: the K samples together)."""


def require(prompt: Mapping[str, Any], key: str, reward: str) -> Any:
    """The field `key` of a task record, or a ConfigError naming it."""
    if key not in prompt:
        raise ConfigError(
            f"task record for reward {reward!r} has no {key!r} field; "
            f"give each record a {key!r} (it has: {', '.join(sorted(prompt))})"
        )
    return prompt[key]
