"""Shared helpers of the SFT/RL tests: a tiny tokenizer and a tiny saved k2 model (no tests
here)."""

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

    model = ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=1024,
    )
    moe = MoEConfig(
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1
    )
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


def tie_free_checkpoint(path) -> str:
    """`save_tiny_checkpoint` with tie-free routing: layer 1's selection bias keeps experts 0
    and 2 ahead by 2.0 (sigmoid scores lie in (0, 1)), so no float reordering between layouts
    changes a token's experts; returns the URI."""
    from k2_core.modelio import load_model, save_model

    uri, tok = save_tiny_checkpoint(path)
    model = load_model(uri)
    for m in model.modules():
        bias = getattr(getattr(m, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()
                bias[[0, 2]] = 2.0
    save_model(model, uri)
    tok.save(f"{uri}/tokenizer")
    return uri


def _rank_main(rank: int, world: int, port: int, plugins: str, fn, args: tuple, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        K2_LOAD_PLUGINS=plugins,
    )
    torch.set_num_threads(1)
    try:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(fn(*args), f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, plugins: str, fn, args: tuple, out: str) -> list:
    """`fn(*args)` on `world` gloo ranks of one node (1 thread each); the JSON result of each
    rank, which must be the same on every rank."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, plugins, fn, args, out), nprocs=world, join=True)
    per_rank = [json.load(open(f"{out}.{r}")) for r in range(world)]
    assert all(p == per_rank[0] for p in per_rank)
    return per_rank[0]


def final_weights(run_dir: str, step: int) -> dict:
    """The model tensors of a run's (layout-free) checkpoint at `step`."""
    from k2_core.checkpoint import load_tensors

    groups, _ = load_tensors(f"{run_dir}/checkpoints/step_{step:08d}", ["model"])
    return groups["model"]


def assert_weights_close(a: dict, b: dict, tol: float) -> None:
    """Every tensor of `a` within relative L2 distance `tol` of `b`'s."""
    assert a.keys() == b.keys()
    for k in a:
        rel = float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12))
        assert rel < tol, (k, rel)


# The small RL iteration both endpoint tests (k2 serve, a real vLLM) run through engine=openai:
# 2 prompts x K=4, short budgets, math reward, no tracking.
ENDPOINT_RL_SMALL = [
    "train.eval_every=0",
    "checkpoint.every=100",
    "plugins.rl.eval_prompts=0",
    "data.seq_len=128",
    "data.options.builtin_n=50",
    "train.micro_batch_size=2",
    "optim.lr=2e-2",
    "plugins.rl.k=4",
    "plugins.rl.prompts_per_iter=2",
    "plugins.rl.segment_tokens=6",
    "plugins.rl.default_budget=14",
    "plugins.rl.ptx_weight=1.0",
    "plugins.rl.partial_rollout=false",
    "tracking.tracker=null",
    "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 14}]",
]
