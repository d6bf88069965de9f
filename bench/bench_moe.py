"""MoE block benchmark: k2_moe.MoE vs transformers DeepseekV3MoE (grouped_mm experts).

The `tiny` preset's MoE shape on 2,048 tokens, forward + backward, fp32 and bf16 autocast,
identical weights. Prints tokens/s, the k2/transformers ratio and achieved GFLOP/s against a
measured 2048^3 matmul peak. Run: `uv run python bench/bench_moe.py [--reps 15] [--kernel loop]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch


def tiny_configs():
    try:
        from k2_core.configio import load_config

        cfg = load_config("tiny")
        return cfg.model, cfg.moe
    except Exception:  # k2_core.configio missing or broken: the tiny shape, hardcoded
        from k2_core.config import ModelConfig, MoEConfig

        return (
            ModelConfig(
                hidden_size=256,
                intermediate_size=768,
                num_hidden_layers=4,
                num_attention_heads=8,
                vocab_size=8192,
            ),
            MoEConfig(
                moe_intermediate_size=128,
                n_routed_experts=16,
                num_experts_per_tok=4,
                n_shared_experts=1,
                n_group=1,
                topk_group=1,
            ),
        )


def hf_moe(model, moe, impl: str = "grouped_mm"):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        moe_intermediate_size=moe.moe_intermediate_size,
        n_routed_experts=moe.n_routed_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        n_shared_experts=moe.n_shared_experts,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
    )
    cfg._experts_implementation = impl  # what from_config(..., experts_implementation=) sets
    return DeepseekV3MoE(cfg)


def flops_fwd_bwd(model, moe, n_tokens: int) -> float:
    """Matmul FLOPs of one forward + backward (backward = 2x forward)."""
    h, i, e, k = (
        model.hidden_size,
        moe.moe_intermediate_size,
        moe.n_routed_experts,
        moe.num_experts_per_tok,
    )
    routed = n_tokens * k * (2 * h * 2 * i + 2 * i * h)
    shared = n_tokens * (2 * h * 2 * i * moe.n_shared_experts + 2 * i * moe.n_shared_experts * h)
    router = n_tokens * 2 * h * e
    return 3.0 * (routed + shared + router)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def step(module, x, g, ctx):
    module.zero_grad(set_to_none=True)
    x.grad = None
    with ctx():
        y = module(x)
    y.backward(g)


def bench(mods: dict, x, g, ctx, reps: int, warmup: int = 3, block: int = 5) -> dict[str, float]:
    """Median seconds per fwd+bwd of each module.

    Modules alternate in blocks of `block` steps (the first step of each block is not timed),
    so machine noise hits all of them alike while each runs in its own steady state (a
    training loop runs one implementation, not two interleaved step by step).
    """
    for _ in range(warmup):
        for m in mods.values():
            step(m, x, g, ctx)
    times: dict[str, list[float]] = {k: [] for k in mods}
    while min(len(v) for v in times.values()) < reps:
        for name, m in mods.items():
            step(m, x, g, ctx)
            for _ in range(block):
                t = time.perf_counter()
                step(m, x, g, ctx)
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", default="auto", choices=["auto", "loop", "grouped_mm"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from k2_core.registry import Registry
    from k2_moe.plugin import k2_register

    model, moe = tiny_configs()
    reg = Registry()
    k2_register(reg)
    k2 = reg.build("ffn", "moe", model, moe, 1, registry=reg, options={"kernel": args.kernel})
    with torch.no_grad():
        k2.gate.e_score_correction_bias.normal_(0, 0.01)
    hf = hf_moe(model, moe)
    hf.load_state_dict(k2.state_dict(), strict=True)
    k2.train()
    hf.train()

    b = 8
    x = torch.randn(b, args.tokens // b, model.hidden_size, requires_grad=True)
    g = torch.randn_like(x)
    with torch.no_grad():
        err = (k2(x) - hf(x)).abs().max().item()
    fl = flops_fwd_bwd(model, moe, args.tokens)
    print(
        f"MoE block: hidden {model.hidden_size}, expert inter {moe.moe_intermediate_size}, "
        f"{moe.n_routed_experts} experts top-{moe.num_experts_per_tok}, "
        f"{moe.n_shared_experts} shared; "
        f"{args.tokens} tokens fwd+bwd; threads {args.threads}; k2 kernel {args.kernel}; "
        f"{fl / 1e9:.2f} GFLOP/step; fp32 max|k2-hf| = {err:.1e}"
    )
    print(
        f"{'precision':<10}{'transformers tok/s':>20}{'k2 tok/s':>12}{'k2/hf':>8}"
        f"{'hf GFLOP/s':>12}{'k2 GFLOP/s':>12}{'peak':>8}{'k2 %peak':>10}"
    )
    for name, dtype, ctx in (
        ("fp32", torch.float32, nullcontext),
        ("bf16", torch.bfloat16, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ):
        peak = matmul_peak(dtype)
        t = bench({"hf": hf, "k2": k2}, x, g, ctx, args.reps)
        tok_hf, tok_k2 = args.tokens / t["hf"], args.tokens / t["k2"]
        gf_hf, gf_k2 = fl / t["hf"] / 1e9, fl / t["k2"] / 1e9
        print(
            f"{name:<10}{tok_hf:>20,.0f}{tok_k2:>12,.0f}{tok_k2 / tok_hf:>8.2f}"
            f"{gf_hf:>12.1f}{gf_k2:>12.1f}{peak:>8.0f}{100 * gf_k2 / peak:>9.1f}%"
        )


if __name__ == "__main__":
    main()
