"""`count_parameters` equals what transformers and k2's own model count, for many configs."""

from __future__ import annotations

import pytest
import torch
from k2_core.configio import load_config
from k2_core.hf import config_to_hf
from k2_core.model import build_model
from k2_core.params import count_parameters

CASES = [
    ["model.q_lora_rank=null"],
    ["model.first_k_dense_replace=3", "moe.n_shared_experts=2"],
    ["moe.n_group=4", "moe.topk_group=2", "moe.n_shared_experts=0"],
    ["model.attention_bias=true"],
    ["model.tie_word_embeddings=true"],
    [],
]


def _hf_count(cfg) -> int:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(DeepseekV3Config(**config_to_hf(cfg.model, cfg.moe)))
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("overrides", CASES)
def test_counts_match_transformers_and_k2(overrides):
    cfg = load_config("tiny", overrides)
    counts = count_parameters(cfg.model, cfg.moe)
    with torch.device("meta"):
        ours = build_model(cfg)
    assert counts["total"] == sum(p.numel() for p in ours.parameters())
    assert counts["total"] == _hf_count(cfg)


def test_k2_1t_exact_on_meta_model():
    cfg = load_config("k2-1t")
    counts = count_parameters(cfg.model, cfg.moe)
    assert (counts["total"], counts["active"]) == (1_026_408_209_408, 32_861_477_888)
    assert counts["total"] == _hf_count(cfg)


def test_active_counts_k_of_n_experts():
    cfg = load_config("tiny")
    c = count_parameters(cfg.model, cfg.moe)
    expert = 3 * cfg.model.hidden_size * cfg.moe.moe_intermediate_size
    moe_layers = cfg.model.num_hidden_layers - cfg.model.first_k_dense_replace
    assert c["total"] - c["active"] == expert * moe_layers * (
        cfg.moe.n_routed_experts - cfg.moe.num_experts_per_tok
    )
