"""Whole-model training step: k2 (k2_core.model + k2_moe) vs transformers DeepseekV3ForCausalLM.

`tiny` preset shape, batch 8 x 256, forward + backward + torch.optim.AdamW step, fp32 and bf16
autocast; transformers with `experts_implementation="grouped_mm"` and sdpa attention; the same
weights in both (copied by state-dict name). Prints tokens/s and the k2/transformers ratio.
Run: `uv run python bench/bench_model.py [--reps 10]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch


def build_pair(preset: str = "tiny"):
    from k2_core.configio import load_config
    from k2_core.hf import config_to_hf
    from k2_core.model import build_model
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = load_config(preset)
    k2 = build_model(cfg)
    hf_cfg = DeepseekV3Config(
        **{
            k: v
            for k, v in config_to_hf(cfg.model, cfg.moe).items()
            if k not in ("architectures", "model_type", "torch_dtype", "dtype")
        }
    )
    hf = DeepseekV3ForCausalLM._from_config(
        hf_cfg, experts_implementation="grouped_mm", attn_implementation="sdpa"
    )
    missing, unexpected = hf.load_state_dict(k2.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(
            f"state dicts differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return cfg, k2, hf


def step_gflop(cfg, batch: int, seq: int) -> float:
    """Matmul GFLOP of one training step: 6 x tokens x active matmul params, plus attention."""
    from k2_core.params import count_parameters

    c = count_parameters(cfg.model, cfg.moe)
    matmul_params = c["active"] - c["embedding"] - c["norms"]
    m = cfg.model
    # QK^T and PV per layer, causal half, forward; backward is twice the forward.
    attn = 2 * batch * m.num_attention_heads * seq * seq * (m.qk_head_dim + m.v_head_dim) / 2
    return (6 * batch * seq * matmul_params + 3 * m.num_hidden_layers * attn) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg, k2, hf = build_pair()
    k2.train()
    hf.train()
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq))
    shifted = torch.cat(
        [ids[:, 1:], torch.full((args.batch, 1), -100)], dim=1
    )  # k2 takes shifted labels
    with torch.no_grad():
        l_k2 = k2(ids, labels=shifted).loss.item()
        l_hf = hf(input_ids=ids, labels=ids).loss.item()
    opts = {
        "k2": torch.optim.AdamW(k2.parameters(), lr=1e-4),
        "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4),
    }

    def step(name, ctx):
        model, opt = (k2, opts["k2"]) if name == "k2" else (hf, opts["hf"])
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = (
                model(ids, labels=shifted, return_logits=False).loss
                if name == "k2"
                else model(input_ids=ids, labels=ids).loss
            )
        loss.backward()
        opt.step()
        if name == "k2":
            k2.update_router_bias()

    n_tok = args.batch * args.seq
    print(
        f"model: tiny preset, {sum(p.numel() for p in k2.parameters()) / 1e6:.1f}M params, "
        f"{cfg.model.num_hidden_layers} layers, {cfg.moe.n_routed_experts} experts top-"
        f"{cfg.moe.num_experts_per_tok}; batch {args.batch} x {args.seq}; threads {args.threads}; "
        f"initial loss k2 {l_k2:.5f} / transformers {l_hf:.5f}"
    )
    from bench_moe import matmul_peak

    gflop = step_gflop(cfg, args.batch, args.seq)
    print(f"{gflop:.1f} GFLOP per step (matmuls and attention)")
    print(
        f"{'precision':<10}{'transformers tok/s':>20}{'k2 tok/s':>12}{'k2/hf':>8}"
        f"{'hf GFLOP/s':>12}{'k2 GFLOP/s':>12}{'peak':>8}{'k2 %peak':>10}"
    )
    for name, ctx in (
        ("fp32", nullcontext),
        ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ):
        for _ in range(2):
            step("hf", ctx)
            step("k2", ctx)
        times = {"hf": [], "k2": []}
        for _ in range(args.reps):  # interleaved so machine noise hits both alike
            for which in ("hf", "k2"):
                t = time.perf_counter()
                step(which, ctx)
                times[which].append(time.perf_counter() - t)
        tok_hf = n_tok / statistics.median(times["hf"])
        tok_k2 = n_tok / statistics.median(times["k2"])
        peak = matmul_peak(torch.float32 if name == "fp32" else torch.bfloat16)
        g_hf, g_k2 = gflop * tok_hf / n_tok, gflop * tok_k2 / n_tok
        print(
            f"{name:<10}{tok_hf:>20,.0f}{tok_k2:>12,.0f}{tok_k2 / tok_hf:>8.2f}"
            f"{g_hf:>12.1f}{g_k2:>12.1f}{peak:>8.0f}{100 * g_k2 / peak:>9.1f}%"
        )


if __name__ == "__main__":
    main()
