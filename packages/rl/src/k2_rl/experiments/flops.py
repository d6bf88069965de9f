"""Analytic FLOPs of a k2 model per token (one multiply-add = 2 FLOPs).

Counted: every matmul a token goes through (MLA projections, the attention core over `context`
keys, the dense SwiGLU, the router, the shared and the k chosen experts, the LM head).
Not counted: norms, softmax, rotary, the embedding lookup (all small next to the matmuls).
The attention core is counted as computed (scores over qk_head_dim, values over v_head_dim per
head), not in MLA's absorbed-weight form; the K2 report's head study counts it the same way.
"""

from __future__ import annotations

from k2_core.config import ModelConfig, MoEConfig


def attention_projection_flops(m: ModelConfig) -> int:
    """FLOPs of one MLA block's projections for one token (query, kv latent, kv up, output)."""
    h, heads = m.hidden_size, m.num_attention_heads
    if m.q_lora_rank is None:
        q = h * heads * m.qk_head_dim
    else:
        q = h * m.q_lora_rank + m.q_lora_rank * heads * m.qk_head_dim
    kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_b = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    o = heads * m.v_head_dim * h
    return 2 * (q + kv_a + kv_b + o)


def attention_core_flops(m: ModelConfig, context: float) -> float:
    """FLOPs of one layer's scores and weighted values for one query over `context` keys."""
    return 2.0 * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * context


def ffn_flops(m: ModelConfig, moe: MoEConfig, layer: int) -> int:
    """FLOPs of layer `layer`'s feed-forward for one token (dense, or router + active experts)."""
    h = m.hidden_size
    if layer < m.first_k_dense_replace:
        return 2 * 3 * h * m.intermediate_size
    experts = moe.num_experts_per_tok + moe.n_shared_experts
    return 2 * h * moe.n_routed_experts + 2 * 3 * h * moe.moe_intermediate_size * experts


def forward_flops_per_token(m: ModelConfig, moe: MoEConfig, context: float) -> float:
    """Forward FLOPs of one token that attends to `context` keys (all layers and the LM head)."""
    per_layer = attention_projection_flops(m) + attention_core_flops(m, context)
    layers = sum(per_layer + ffn_flops(m, moe, i) for i in range(m.num_hidden_layers))
    return layers + 2 * m.hidden_size * m.vocab_size


def attention_flops_per_token(m: ModelConfig, context: float) -> float:
    """The attention share (projections and core, all layers) of forward_flops_per_token."""
    return m.num_hidden_layers * (attention_projection_flops(m) + attention_core_flops(m, context))


def train_flops_per_token(m: ModelConfig, moe: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward (3x the forward) at the mean causal context
    of a `seq_len` sequence."""
    return 3.0 * forward_flops_per_token(m, moe, (seq_len + 1) / 2)
