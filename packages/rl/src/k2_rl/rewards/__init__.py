"""Verifiable rewards for RL: `math`, `code` (in the sandbox) and `instruction` rule checks."""

from .base import Reward, RewardResult

__all__ = ["Reward", "RewardResult"]
