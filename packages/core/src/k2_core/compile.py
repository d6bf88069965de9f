"""`train.compile`: regional `torch.compile` of each decoder block, applied from outside the model.

As torchtitan does, each decoder layer is compiled on its own (one graph per block shape, reused
by every layer of that shape), not the whole model: compile time stays that of one block and the
parts that must talk to the host stay eager. Per layer the training forward (no KV cache) runs:

- dense layers: the whole block, `x + attn(norm(x))` then `+ ffn(norm(.))`, as one graph;
- MoE layers: the attention half and the next norm as one graph, the router as another; the
  routed experts (k2_moe's hand-written kernel with its own backward, or the expert-parallel
  dispatch) stay eager, because their split sizes must reach the host (one sync per layer,
  the all-to-all's under expert parallelism) and no compiled region may hold that sync.

Compiled regions are `fullgraph=True`: a graph break is an error, not a silent slow path.
QK-Clip's max-logit recording runs inside the attention graph (a no-grad matmul and amax; the
running max is a module attribute Dynamo writes back). The state-dict names, the checkpoint
layout and the parameters the optimizer holds are unchanged (nothing wraps a module), so a
checkpoint written compiled resumes eager and vice versa. Decoding with a KV cache and the
embedding, final norm and fused head/loss (a chunked autograd function already) stay eager.

Activation policies (k2_hw_h800.activations) recognise saved tensors through saved-tensor hooks
and patched forwards that a compiled graph bypasses; that combination is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError

_COMPILED_ATTR = "_k2_compiled"


def _attn_half(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)
    return h, layer.post_attention_layernorm(h)


def _dense_block(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _route(gate: nn.Module, x: torch.Tensor) -> Any:
    return type(gate).forward(gate, x)  # the class's: the instance's `forward` is this region


# one compiled callable per region kind: every layer of the same shape reuses its graph
_COMPILED: dict[str, Any] = {}


def _compiled(name: str) -> Any:
    if name not in _COMPILED:
        fn = {"attn": _attn_half, "dense": _dense_block, "route": _route}[name]
        _COMPILED[name] = torch.compile(fn, fullgraph=True)
    return _COMPILED[name]


def refuse_activation_policy(model: nn.Module) -> None:
    """Raise the one-line ConfigError when an activation policy is applied to `model`."""
    policy = getattr(getattr(model, "_k2_activation_policy", None), "policy", None)
    if policy is not None and policy.active:
        on = [k for k in ("recompute", "fp8_storage", "cpu_offload") if getattr(policy, k, False)]
        raise ConfigError(
            "train.compile=true cannot be combined with parallel.options.activation_policy "
            f"({', '.join(on)}): the policy's saved-tensor hooks do not hold inside compiled "
            "blocks; set train.compile=false or an empty activation_policy"
        )


def _layer_forward(layer: nn.Module, orig: Any, dense: bool) -> Any:
    def forward(
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: Any = None,
    ) -> torch.Tensor:
        if cache is not None:  # decoding: per-token shapes, stays eager
            return orig(x, cos, sin, attn_mask, cache)
        if dense:
            return _compiled("dense")(layer, x, cos, sin, attn_mask)
        h, normed = _compiled("attn")(layer, x, cos, sin, attn_mask)
        return h + layer.mlp(normed)

    return forward


def _route_forward(gate: nn.Module) -> Any:
    def forward(x: torch.Tensor) -> Any:
        return _compiled("route")(gate, x)

    return forward


def _raise_cache_limit(n_layers: int) -> None:
    # Dynamo guards on the module a region is given; every layer is a new cache entry of the
    # same code object, and past the limit it would silently run eager
    cfg = torch._dynamo.config
    want = 4 * n_layers + 8  # x (train, eval) x (first micro-batch, later ones)
    cfg.cache_size_limit = max(cfg.cache_size_limit, want)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * want)


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile each decoder block of a built K2ForCausalLM in place (see the module doc);
    returns it."""
    from .model.protocols import LoadBalanced

    refuse_activation_policy(model)
    if getattr(model, _COMPILED_ATTR, False):
        return model
    layers = list(model.model.layers)
    _raise_cache_limit(len(layers))
    for layer in layers:
        dense = not isinstance(layer.mlp, LoadBalanced)
        # instance attributes shadow the methods: state-dict names stay as they are
        layer.forward = _layer_forward(layer, layer.forward, dense)
        gate = getattr(layer.mlp, "gate", None)
        if not dense and isinstance(gate, nn.Module):
            gate.forward = _route_forward(gate)
    setattr(model, _COMPILED_ATTR, True)
    return model
