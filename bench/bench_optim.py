"""Optimizer step benchmark: k2_optim.MuonClip (QK-Clip on) vs torch.optim.Muon vs AdamW.

Parameters shaped like the `small` preset's MoE layers (hidden 1024, 16 heads, q_lora 384,
kv_lora 256, nope/rope/v 64/32/64, 64 experts of width 512, one shared expert), built
directly as tensors: per layer q_a/q_b/kv_a/kv_b/o projections, experts.gate_up_proj
[E, 2I, H] (muon_split=2) and experts.down_proj [E, H, I], shared-expert gate/up/down. The
default, 1 layer, is ~105M parameters (fp32; torch.optim.Muon takes ~40 s a step on 2 CPU
cores); `--layers` scales it. Random gradients, median step time over `--reps` steps after one
warm-up step.

- MuonClip: one batched NS per matrix shape; QK-Clip on every layer (half the heads over tau).
- torch.optim.Muon(adjust_lr_fn="match_rms_adamw"): 2-D params only, so each expert tensor is
  passed as E separate 2-D matrices ([2I, H] gate_up blocks are orthogonalised whole: torch
  has no muon_split, which also costs it ~2.4x more NS FLOPs on gate_up).
- torch.optim.AdamW(foreach=True) on the same parameters as MuonClip.

Peak temporary bytes of a step (beside its time): the rise of the process's peak RSS over a
step after the warm-up (VmHWM reset through /proc/self/clear_refs; glibc told to mmap every
allocation over 64 KiB so that freed tensors leave RSS at once), for
- "whole-group" MuonClip: the step as it was before bounded buckets (Nesterov `_foreach_add`
  over the whole group, one `torch.cat` per shape, the whole Newton-Schulz output), kept here
  as `WholeGroupMuonClip` for the comparison;
- MuonClip with `bucket_bytes` 64 MiB (the default) and `--small-bucket` MiB.

Run: `uv run python bench/bench_optim.py [--layers 1] [--experts 64] [--reps 3]`.

`--family tiny|small|k2` instead times the Muon step on an MoE-shaped parameter set against
`torch.optim.Muon` given the *same* matrices (issue 19): per layer the MLA matrices, a
shared expert and 3-D expert stacks (gate_up [E, 2I, H] with muon_split=2, down [E, H, I]);
torch gets every expert's gate, up and down block as its own 2-D parameter, so both sides
orthogonalise the same matrices (same FLOPs). Shapes: `tiny` / `small` are the presets'
(16 / 64 experts), `k2` keeps K2's head dims (nope/rope/v 128/64/128) and its expert
width-to-hidden ratio at hidden 1536, 12 heads, expert width 384, 32 experts. The two
optimizers alternate step by step (one warm-up step each), the ratio is taken per pair and
its median printed (CPU time with `--threads 1`, else wall time); `--profile` adds the
largest ops' shares of a k2 step.
`uv run python bench/bench_optim.py --family small --family-layers 1 --reps 3`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from k2_optim import MuonClip, QKClipTarget, newton_schulz
from k2_optim.muon import adjusted_scale, matrix_view_shape

H, HEADS, QL, KVL, NOPE, ROPE, V, INTER = 1024, 16, 384, 256, 64, 32, 64, 512


def small_from_preset():
    """Read the small preset's shape when k2_core is importable (the numbers above otherwise)."""
    global H, HEADS, QL, KVL, NOPE, ROPE, V, INTER
    try:
        from k2_core.configio import _load_source

        d = _load_source("small")
        m, moe = d["model"], d["moe"]
        H, HEADS, QL, KVL = (
            m["hidden_size"],
            m["num_attention_heads"],
            m["q_lora_rank"],
            m["kv_lora_rank"],
        )
        NOPE, ROPE, V, INTER = (
            m["qk_nope_head_dim"],
            m["qk_rope_head_dim"],
            m["v_head_dim"],
            moe["moe_intermediate_size"],
        )
        return moe["n_routed_experts"]
    except Exception:  # noqa: BLE001
        return 64


def layer_params(experts: int) -> dict[str, torch.Tensor]:
    shapes = {
        "q_a_proj": (QL, H),
        "q_b_proj": (HEADS * (NOPE + ROPE), QL),
        "kv_a_proj_with_mqa": (KVL + ROPE, H),
        "kv_b_proj": (HEADS * (NOPE + V), KVL),
        "o_proj": (H, HEADS * V),
        "gate_up_proj": (experts, 2 * INTER, H),
        "down_proj": (experts, H, INTER),
        "shared_gate": (INTER, H),
        "shared_up": (INTER, H),
        "shared_down": (H, INTER),
    }
    out = {}
    for k, s in shapes.items():
        p = torch.nn.Parameter(torch.randn(s) * 0.02)
        if k == "gate_up_proj":
            p.muon_split = 2
        out[k] = p
    return out


class WholeGroupMuonClip(MuonClip):
    """MuonClip's Muon update as it was before bounded buckets: whole-group temporaries."""

    def _muon_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, mu = float(group["lr"]), group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(st["momentum_buffer"])
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        buckets: dict[tuple, list[int]] = defaultdict(list)
        shapes = []
        for i, p in enumerate(params):
            n, r, c = matrix_view_shape(p)
            shapes.append(n)
            buckets[(r, c, p.device, p.dtype)].append(i)
        outs = []
        for (r, c, _dev, dtype), idxs in buckets.items():
            mats = [updates[i].reshape(shapes[i], r, c) for i in idxs]
            stacked = mats[0] if len(mats) == 1 else torch.cat(mats)
            o = newton_schulz(
                stacked,
                group["ns_steps"],
                group["ns_coefficients"],
                group["ns_eps"],
                dtype=self.ns_dtype,
                out_dtype=dtype,
            )
            outs.append(
                (
                    idxs,
                    [
                        x.reshape(params[i].shape)
                        for x, i in zip(o.split([shapes[i] for i in idxs]), idxs, strict=True)
                    ],
                    adjusted_scale(r, c, group["adjust_lr_fn"]),
                )
            )
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        for idxs, o, scale in outs:
            torch._foreach_add_([params[i] for i in idxs], o, alpha=-lr * scale)


FAMILIES = {
    # hidden, heads, q_lora, kv_lora, nope, rope, v, expert width, experts, layers
    "tiny": (256, 8, 128, 64, 32, 16, 32, 128, 16, 4),
    "small": (1024, 16, 384, 256, 64, 32, 64, 512, 64, 1),
    "k2": (1536, 12, 384, 128, 128, 64, 128, 384, 32, 1),
}


def family_params(
    name: str, layers: int | None, experts: int | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(k2 parameters, torch's 2-D parameters holding the same matrices, layers)."""
    h, heads, ql, kvl, nope, rope, v, inter, e, nl = FAMILIES[name]
    e, nl = experts or e, layers or nl
    shapes = {
        "q_a_proj": (ql, h),
        "q_b_proj": (heads * (nope + rope), ql),
        "kv_a_proj_with_mqa": (kvl + rope, h),
        "kv_b_proj": (heads * (nope + v), kvl),
        "o_proj": (h, heads * v),
        "gate_up_proj": (e, 2 * inter, h),
        "down_proj": (e, h, inter),
        "shared_gate": (inter, h),
        "shared_up": (inter, h),
        "shared_down": (h, inter),
    }
    ours, theirs = [], []
    for _ in range(nl):
        for k, shape in shapes.items():
            p = torch.nn.Parameter(torch.randn(shape) * 0.02)
            p.grad = torch.randn(shape) * 1e-3
            if k == "gate_up_proj":
                p.muon_split = 2
            ours.append(p)
            n, r, c = matrix_view_shape(p)
            for w, g in zip(p.detach().reshape(n, r, c), p.grad.reshape(n, r, c), strict=True):
                q = torch.nn.Parameter(w.clone())
                q.grad = g.clone()
                theirs.append(q)
    return ours, theirs, nl


def run_family(args: argparse.Namespace) -> None:
    """k2_optim.Muon vs torch.optim.Muon on the same matrices, alternating step by step."""
    from k2_optim import Muon

    torch.manual_seed(0)
    ours, theirs, nl = family_params(args.family, args.family_layers, args.experts)
    numel = sum(p.numel() for p in ours)
    print(
        f"family {args.family}: {nl} layers, {numel / 1e6:.1f}M params; k2: {len(ours)} "
        f"tensors, torch.optim.Muon: {len(theirs)} 2-D matrices; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    kw = dict(lr=2e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    k2 = Muon(ours, **kw)
    ref = torch.optim.Muon(theirs, **kw)
    k2.step()
    ref.step()
    # one thread: this process's CPU time (robust to other jobs on a shared box); more
    # threads: wall time (their spin-waits would count as CPU time)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    pairs = []
    for _ in range(args.reps):
        t0 = clock()
        k2.step()
        t1 = clock()
        ref.step()
        t2 = clock()
        pairs.append((t1 - t0, t2 - t1))
    ks, ts = [a for a, _ in pairs], [b for _, b in pairs]
    ratio = statistics.median(a / b for a, b in pairs)
    print(
        f"  k2_optim.Muon        median {statistics.median(ks) * 1e3:9.1f} ms/step  "
        f"({', '.join(f'{t * 1e3:.0f}' for t in ks)})"
    )
    print(
        f"  torch.optim.Muon     median {statistics.median(ts) * 1e3:9.1f} ms/step  "
        f"({', '.join(f'{t * 1e3:.0f}' for t in ts)})"
    )
    print(
        f"k2 / torch.optim.Muon time ratio (median of {len(pairs)} pairs): {ratio:.2f} "
        f"(target <= 0.5)"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            k2.step()
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]:
            print(
                f"  profile: {e.key:<28s} "
                f"{100 * e.self_cpu_time_total / total:5.1f}% of the k2 step"
            )


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_temporary_bytes(fn: Any) -> int:
    """How far the peak RSS rises above the RSS before `fn()` while it runs."""
    gc.collect()
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return _status("VmHWM:") - base


def peak_of(opt, params, grads) -> int:
    """Peak temporary bytes of one step after a warm-up step (state allocation)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    return peak_temporary_bytes(opt.step)


def timed(opt, params, grads, reps) -> float:
    """Median step seconds after a warm-up step."""
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
    ap.add_argument("--small-bucket", type=int, default=8, help="MiB")
    ap.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default=None,
        help="time Muon vs torch.optim.Muon on this MoE shape family only",
    )
    ap.add_argument("--family-layers", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family:
        run_family(args)
        return
    experts = args.experts or small_from_preset()
    torch.manual_seed(0)
    layers = [layer_params(experts) for _ in range(args.layers)]
    params = [p for lp in layers for p in lp.values()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n = sum(p.numel() for p in params)
    print(
        f"{args.layers} layers of the small preset's MoE layer, {experts} experts: "
        f"{n / 1e6:.1f}M params, {len(params)} tensors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    logits = torch.linspace(50.0, 150.0, HEADS)  # half the heads over tau = 100
    targets = [
        QKClipTarget(
            max_logits=lambda: logits,
            q_weight=lp["q_b_proj"],
            k_weight=lp["kv_b_proj"],
            heads=HEADS,
            q_sqrt_rows=slice(0, NOPE),
            q_gamma_rows=slice(NOPE, NOPE + ROPE),
            k_sqrt_rows=slice(0, NOPE),
        )
        for lp in layers
    ]
    res = {}
    base_name = "k2_optim.MuonClip (QK-Clip on)"
    muon_bytes = sum(p.numel() * p.element_size() for p in params)
    variants = (
        ("MuonClip, whole-group step (before)", WholeGroupMuonClip, {}),
        (base_name, MuonClip, {}),
        (
            f"MuonClip, bucket_bytes {args.small_bucket} MiB",
            MuonClip,
            {"bucket_bytes": args.small_bucket << 20},
        ),
    )
    for name, cls, kw in variants:
        opt = cls(params, lr=2e-4, weight_decay=0.1, qk_clip_targets=targets, **kw)
        res[name] = timed(opt, params, grads, args.reps)
        opt.remove_hooks()
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

    # memory last: mmapping every allocation over 64 KiB (so that RSS follows the live
    # tensors) makes each allocation fault its pages in, which would distort the times
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    peaks = {}
    for name, cls, kw in variants:
        opt = cls(params, lr=2e-4, weight_decay=0.1, qk_clip_targets=targets, **kw)
        peaks[name] = peak_of(opt, params, grads)
        opt.remove_hooks()
        del opt
    peaks["torch.optim.AdamW (foreach)"] = peak_of(
        torch.optim.AdamW(params, lr=2e-4, weight_decay=0.1, foreach=True), params, grads
    )

    base = res[base_name]
    print(f"parameter bytes {muon_bytes / 2**20:.0f} MiB")
    for name, t in res.items():
        peak = peaks.get(name)
        mem = (
            ""
            if peak is None
            else (f"   peak temporaries {peak / 2**20:6.0f} MiB ({peak / muon_bytes:4.2f}x params)")
        )
        print(f"  {name:<40s} {t * 1e3:10.1f} ms/step   MuonClip/this = {base / t:5.2f}{mem}")
    tm = [t for k, t in res.items() if k.startswith("torch.optim.Muon")]
    if tm:
        print(f"MuonClip / torch.optim.Muon time ratio: {base / tm[0]:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
