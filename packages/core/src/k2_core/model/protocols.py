"""What the decoder expects of pluggable parts, so k2_core never imports a plugin."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LoadBalanced(Protocol):
    """An FFN with routed experts (the `ffn` slot's MoE implementations).

    The decoder and the orchestrator use only these members:
    - `aux_loss`: the balance loss of the last forward (a scalar tensor), or None;
    - `update_router_bias()`: apply the aux-loss-free bias update from the expert counts
      accumulated since the last call, then reset them (once per optimizer step);
    - `reset_counts()`: drop the accumulated counts without an update (a skipped step);
    - `load_stats()`: the accumulated per-expert token counts and their max/mean.
    """

    aux_loss: torch.Tensor | None

    def update_router_bias(self) -> None:
        """Apply and reset the bias update for the counts gathered this step."""

    def reset_counts(self) -> None:
        """Zero the counts gathered this step without touching the bias."""

    def load_stats(self) -> dict[str, torch.Tensor]:
        """`counts` [E] (tokens per expert since the last bias update) and `max_over_mean`."""
