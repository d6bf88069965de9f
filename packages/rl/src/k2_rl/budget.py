"""Token budget per task type: over-budget responses are truncated and get a penalty reward."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetDecision:
    """What the budget does to one response: its kept length and whether it was cut."""

    keep: int
    over_budget: bool


def apply_budget(n_tokens: int, finished: bool, budget: int | None) -> BudgetDecision:
    """Decide for a response of `n_tokens` (finished: it ended on its own) under `budget`.

    A response is over budget when it is longer than the budget, or when it reached the budget
    without finishing (it would have run on); it is cut to the budget.
    """
    if budget is None:
        return BudgetDecision(n_tokens, False)
    over = n_tokens > budget or (n_tokens == budget and not finished)
    return BudgetDecision(min(n_tokens, budget), over)


def budget_for(task: str, budgets: dict[str, int], default: int | None) -> int | None:
    """The token budget of `task` (its own entry, else the default; None: unlimited)."""
    return budgets.get(task, default)


def penalised(reward: float, over_budget: bool, penalty: float) -> float:
    """The reward after the budget: the configured penalty replaces it when over budget."""
    return penalty if over_budget else reward
