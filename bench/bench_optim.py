"""Optimizer step benchmark: k2_optim.MuonClip (QK-Clip on) vs torch.optim.Muon vs AdamW.

Parameters shaped like the `small` preset's MoE layers (hidden 1024, 16 heads, q_lora 384,
kv_lora 256, nope/rope/v 64/32/64, 64 experts of width 512, one shared expert), built
directly as tensors: per layer q_a/q_b/kv_a/kv_b/o projections, experts.gate_up_proj
[E, 2I, H] (muon_split=2) and experts.down_proj [E, H, I], shared-expert gate/up/down. The
default, 1 layer, is ~105M parameters (fp32; torch.optim.Muon takes ~40 s a step on 2 CPU cores); `--layers` scales it. Random gradients,
median step time over `--reps` steps after one warm-up step.

- MuonClip: one batched NS per matrix shape; QK-Clip on every layer (half the heads over tau).
- torch.optim.Muon(adjust_lr_fn="match_rms_adamw"): 2-D params only, so each expert tensor is
  passed as E separate 2-D matrices ([2I, H] gate_up blocks are orthogonalised whole: torch
  has no muon_split, which also costs it ~2.4x more NS FLOPs on gate_up).
- torch.optim.AdamW(foreach=True) on the same parameters as MuonClip.

Run: `uv run python bench/bench_optim.py [--layers 1] [--experts 64] [--reps 3]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from k2_optim import MuonClip, QKClipTarget

H, HEADS, QL, KVL, NOPE, ROPE, V, INTER = 1024, 16, 384, 256, 64, 32, 64, 512


def small_from_preset():
    """Read the small preset's shape when k2_core is importable (the numbers above otherwise)."""
    global H, HEADS, QL, KVL, NOPE, ROPE, V, INTER
    try:
        from k2_core.configio import _load_source

        d = _load_source("small")
        m, moe = d["model"], d["moe"]
        H, HEADS, QL, KVL = m["hidden_size"], m["num_attention_heads"], m["q_lora_rank"], m["kv_lora_rank"]
        NOPE, ROPE, V, INTER = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], moe["moe_intermediate_size"]
        return moe["n_routed_experts"]
    except Exception:  # noqa: BLE001
        return 64


def layer_params(experts: int) -> dict[str, torch.Tensor]:
    shapes = {
        "q_a_proj": (QL, H), "q_b_proj": (HEADS * (NOPE + ROPE), QL),
        "kv_a_proj_with_mqa": (KVL + ROPE, H), "kv_b_proj": (HEADS * (NOPE + V), KVL),
        "o_proj": (H, HEADS * V), "gate_up_proj": (experts, 2 * INTER, H), "down_proj": (experts, H, INTER),
        "shared_gate": (INTER, H), "shared_up": (INTER, H), "shared_down": (H, INTER),
    }
    out = {}
    for k, s in shapes.items():
        p = torch.nn.Parameter(torch.randn(s) * 0.02)
        if k == "gate_up_proj":
            p.muon_split = 2
        out[k] = p
    return out


def timed(opt, params, grads, reps) -> float:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()  # warm-up (state allocation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-torch-muon", action="store_true")
    args = ap.parse_args()
    experts = args.experts or small_from_preset()
    torch.manual_seed(0)
    layers = [layer_params(experts) for _ in range(args.layers)]
    params = [p for lp in layers for p in lp.values()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n = sum(p.numel() for p in params)
    print(f"{args.layers} layers of the small preset's MoE layer, {experts} experts: "
          f"{n / 1e6:.1f}M params, {len(params)} tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    logits = torch.linspace(50.0, 150.0, HEADS)  # half the heads over tau = 100
    targets = [QKClipTarget(max_logits=lambda: logits, q_weight=lp["q_b_proj"], k_weight=lp["kv_b_proj"],
                            heads=HEADS, q_sqrt_rows=slice(0, NOPE), q_gamma_rows=slice(NOPE, NOPE + ROPE),
                            k_sqrt_rows=slice(0, NOPE)) for lp in layers]
    res = {}
    opt = MuonClip(params, lr=2e-4, weight_decay=0.1, qk_clip_targets=targets)
    res["k2_optim.MuonClip (QK-Clip on)"] = timed(opt, params, grads, args.reps)
    del opt

    if not args.skip_torch_muon:
        flat, fgrads = [], []
        for p, g in zip(params, grads, strict=True):
            if p.ndim == 3:
                for e in range(p.shape[0]):
                    flat.append(torch.nn.Parameter(p.detach()[e].clone()))
                    fgrads.append(g[e].clone())
            else:
                flat.append(torch.nn.Parameter(p.detach().clone()))
                fgrads.append(g.clone())
        topt = torch.optim.Muon(flat, lr=2e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        res[f"torch.optim.Muon ({len(flat)} 2-D params)"] = timed(topt, flat, fgrads, args.reps)
        del topt, flat, fgrads

    aopt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.1, foreach=True)
    res["torch.optim.AdamW (foreach)"] = timed(aopt, params, grads, args.reps)

    base = res["k2_optim.MuonClip (QK-Clip on)"]
    for name, t in res.items():
        print(f"  {name:<40s} {t * 1e3:10.1f} ms/step   MuonClip/this = {base / t:5.2f}")
    tm = [t for k, t in res.items() if k.startswith("torch.optim.Muon")]
    if tm:
        print(f"MuonClip / torch.optim.Muon time ratio: {base / tm[0]:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
