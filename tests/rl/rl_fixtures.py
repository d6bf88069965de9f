"""Shared helpers of the SFT/RL tests: a tiny tokenizer and a tiny saved k2 model (no tests here)."""

from __future__ import annotations

import torch


def tiny_tokenizer(vocab: int = 512):
    """A byte-level BPE trained on a few hundred arithmetic solutions (K2 special tokens)."""
    from k2_data.corpus.mathgen import math_problems
    from k2_data.tokenizer import BpeTokenizer

    texts = [p.text for p in math_problems("train", n=300, difficulty=(1, 2), kinds=("addition",))]
    return BpeTokenizer.train(texts, vocab_size=vocab)


def tiny_configs(vocab: int):
    """A 2-layer MLA + MoE model small enough for sub-second steps."""
    from k2_core.config import ModelConfig, MoEConfig

    model = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        max_position_embeddings=1024)
    moe = MoEConfig(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1)
    return model, moe


def save_tiny_checkpoint(path, seed: int = 0):
    """A saved tiny model at `path` with its tokenizer beside it; returns (uri, tokenizer)."""
    from k2_core.model import K2ForCausalLM
    from k2_core.modelio import save_model

    tok = tiny_tokenizer()
    mcfg, ecfg = tiny_configs(tok.vocab_size)
    torch.manual_seed(seed)
    model = K2ForCausalLM(mcfg, ecfg)
    uri = str(path)
    save_model(model, uri)
    tok.save(f"{uri}/tokenizer")
    return uri, tok
