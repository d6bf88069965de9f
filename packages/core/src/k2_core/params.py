"""Exact parameter counts of a config in the HF DeepseekV3 layout, without building the model."""

from __future__ import annotations

from .config import ModelConfig, MoEConfig


def _swiglu(hidden: int, inter: int) -> int:
    return 3 * hidden * inter


def attention_params(m: ModelConfig) -> int:
    """Parameters of one MLA block (projections and its two latent norms)."""
    h, heads = m.hidden_size, m.num_attention_heads
    bias = 1 if m.attention_bias else 0
    if m.q_lora_rank is None:
        q = h * heads * m.qk_head_dim
    else:
        q = (h + bias) * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * m.qk_head_dim
    kv_a = (h + bias) * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_b = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    o = heads * m.v_head_dim * h + bias * h
    return q + kv_a + m.kv_lora_rank + kv_b + o


def count_parameters(m: ModelConfig, moe: MoEConfig) -> dict[str, int]:
    """Total and per-token active parameters, with a breakdown (router bias is a buffer)."""
    h = m.hidden_size
    embed = m.vocab_size * h
    head = 0 if m.tie_word_embeddings else m.vocab_size * h
    dense_layers = m.first_k_dense_replace
    moe_layers = m.num_hidden_layers - dense_layers
    attn = attention_params(m) * m.num_hidden_layers
    norms = 2 * h * m.num_hidden_layers + h
    dense = _swiglu(h, m.intermediate_size) * dense_layers
    expert = _swiglu(h, moe.moe_intermediate_size)
    router = moe.n_routed_experts * h * moe_layers
    shared = expert * moe.n_shared_experts * moe_layers
    routed = expert * moe.n_routed_experts * moe_layers
    routed_active = expert * moe.num_experts_per_tok * moe_layers
    base = embed + head + attn + norms + dense + router + shared
    return {
        "total": base + routed,
        "active": base + routed_active,
        "embedding": embed,
        "lm_head": head,
        "attention": attn,
        "norms": norms,
        "dense_ffn": dense,
        "router": router,
        "shared_experts": shared,
        "routed_experts": routed,
        "routed_experts_active": routed_active,
    }
