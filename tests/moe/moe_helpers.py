"""Helpers for k2_moe tests: small configs and the matching transformers DeepseekV3Config."""

from __future__ import annotations

from k2_core.config import ModelConfig, MoEConfig


def small_configs(
    *,
    n_group: int = 1,
    topk_group: int = 1,
    n_shared: int = 1,
    experts: int = 8,
    k: int = 2,
    **moe_kw,
):
    model = ModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
    )
    moe = MoEConfig(
        moe_intermediate_size=16,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        n_shared_experts=n_shared,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        **moe_kw,
    )
    return model, moe


def hf_config(model: ModelConfig, moe: MoEConfig, experts_implementation: str = "eager"):
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        moe_intermediate_size=moe.moe_intermediate_size,
        n_routed_experts=moe.n_routed_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        n_shared_experts=max(moe.n_shared_experts, 1),
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        vocab_size=model.vocab_size,
    )
    cfg._experts_implementation = experts_implementation
    return cfg
