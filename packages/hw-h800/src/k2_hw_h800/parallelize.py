"""`parallelize(model, options, layout)`: every parallelism applied from outside the model code."""

from __future__ import annotations

from typing import Any

from k2_core.errors import ConfigError
from torch import nn

from .expert_parallel import apply_expert_parallel, moe_layers
from .mesh import Layout
from .options import H800Options


def apply_activation_policy(model: nn.Module, policy: dict[str, Any]) -> Any:
    """Hand the policy switches to k2_hw_h800.activations (bad switches: its ConfigError)."""
    from .activations import apply_activation_policy as apply

    return apply(model, policy)


def parallelize(
    model: nn.Module,
    options: H800Options,
    layout: Layout,
    *,
    experts: bool = True,
    activations: bool = True,
) -> nn.Module:
    """Apply expert parallelism (on meta or materialised weights) and the activation policy to
    `model` in place; returns it. The backend shards experts before it materialises the
    model and applies the policy after (`experts` / `activations` pick the parts).

    Pipeline stages are cut later by the backend (they need the step's micro-batching).
    """
    if experts and layout.ep > 1:
        if not moe_layers(model):
            raise ConfigError(
                f"parallel.options.ep={layout.ep} but the model has no MoE layer to shard"
            )
        apply_expert_parallel(model, layout.ep_rank, layout.ep, layout.ep_group)
    if activations and options.activation_policy:
        apply_activation_policy(model, dict(options.activation_policy))
    return model
