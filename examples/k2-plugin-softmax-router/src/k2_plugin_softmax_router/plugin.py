"""Registers the `softmax_topk` router with k2."""

from __future__ import annotations

from typing import Any

from k2_core import hookimpl
from pydantic import BaseModel, ConfigDict, Field


class SoftmaxTopKOptions(BaseModel):
    """Options of the softmax top-k router (`moe.router_options`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    renormalize: bool = Field(True, description="Rescale the chosen k weights to sum to 1.")


def build_softmax_topk(model: Any, moe: Any, *, options: SoftmaxTopKOptions) -> Any:
    """Softmax over expert logits, then top-k (Mixtral-style; no selection bias)."""
    from .router import SoftmaxTopKRouter

    return SoftmaxTopKRouter(
        model.hidden_size,
        moe.n_routed_experts,
        moe.num_experts_per_tok,
        renormalize=options.renormalize,
        init_std=model.initializer_range,
    )


@hookimpl
def k2_register(registry: Any) -> None:
    """Add `softmax_topk` to the `router` slot."""
    registry.register("router", "softmax_topk", build_softmax_topk, SoftmaxTopKOptions)
