"""`train.compile`: eager vs regionally compiled training step, and the compile time cold and warm.

Per preset (default `tiny`; `--presets tiny,small`) and precision (fp32, bf16 autocast): the
same weights built twice, one left eager and one through `k2_core.compile.compile_blocks`, run
forward (fused head/loss, max-logit recording on, as in training) + backward + AdamW step at
batch x seq tokens, interleaved rep by rep so a shared box's load hits both alike. Prints
tokens/s, model GFLOP/s, the compiled/eager ratio (of the medians, and of the fastest reps:
the steadier figure on a box shared with other work), and the bf16 matmul rate measured at the
model's own shapes (the limit the bf16 step approaches).

Compile time: a child process builds `tiny` and times the first compiled step minus an eager
step, per precision, with an empty torch compile cache (cold: TORCHINDUCTOR_CACHE_DIR is a new
folder) and then again with the cache that child left (warm: a new process, as a second
`k2 train` would be).

`--transformers` adds transformers' eager DeepseekV3 step on the same weights (bench_model.py's
build) to the interleaved loop and prints k2's eager and compiled rates against it.

Run: `uv run python bench/bench_compile.py [--reps 8] [--presets tiny] [--threads 2]
[--transformers]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def build(preset: str, compiled: bool):
    """The preset's model (seeded, identical for both), in training mode, recording max logits."""
    from k2_core.compile import compile_blocks
    from k2_core.configio import load_config
    from k2_core.model import build_model

    cfg = load_config(preset)
    model = build_model(cfg)
    if compiled:
        compile_blocks(model)
    model.train()
    model.set_record_max_logits(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return cfg, model, opt


def make_step(model, opt, ids, labels, bf16: bool):
    """One training step: forward (fused loss) + backward + AdamW."""

    def step() -> float:
        model.reset_max_logits()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def step_gflop(cfg, batch: int, seq: int) -> float:
    """Matmul GFLOP of one training step: 6 x tokens x active matmul params, plus attention."""
    from k2_core.params import count_parameters

    c = count_parameters(cfg.model, cfg.moe)
    matmul_params = c["active"] - c["embedding"] - c["norms"]
    m = cfg.model
    attn = 2 * batch * m.num_attention_heads * seq * seq * (m.qk_head_dim + m.v_head_dim) / 2
    return (6 * batch * seq * matmul_params + 3 * m.num_hidden_layers * attn) / 1e9


def bf16_matmul_gflops(cfg, tokens: int, reps: int = 5) -> float:
    """bf16 matmul GFLOP/s at the model's own shapes (dense FFN, expert, q/kv latents, head)."""
    m, e = cfg.model, cfg.moe
    shapes = [
        (tokens, m.hidden_size, 2 * m.intermediate_size),
        (
            tokens * e.num_experts_per_tok // e.n_routed_experts,
            m.hidden_size,
            2 * e.moe_intermediate_size,
        ),
        (tokens, m.hidden_size, (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim),
        (tokens, m.hidden_size, m.vocab_size),
    ]
    flop = secs = 0.0
    for n, k, o in shapes:
        a = torch.randn(n, k, dtype=torch.bfloat16)
        b = torch.randn(k, o, dtype=torch.bfloat16)
        torch.mm(a, b)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        secs += time.perf_counter() - t
        flop += 2 * n * k * o * reps
    return flop / secs / 1e9


def hf_step(preset: str, ids, labels, bf16: bool):
    """transformers' DeepseekV3ForCausalLM (bench_model.py's build, same weights), eager: the
    peer's training step, fwd + bwd + AdamW."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import build_pair

    _, _, hf = build_pair(preset)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)

    def step() -> float:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def throughput(
    preset: str, bf16: bool, batch: int, seq: int, reps: int, with_hf: bool = False
) -> dict:
    """Eager vs compiled step of `preset` (and transformers' eager step if asked) in one
    process, interleaved; medians."""
    cfg, eager, opt_e = build(preset, False)
    _, comp, opt_c = build(preset, True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    se, sc = make_step(eager, opt_e, ids, labels, bf16), make_step(comp, opt_c, ids, labels, bf16)
    arms = [se, sc] + ([hf_step(preset, ids, labels, bf16)] if with_hf else [])
    se()
    t = time.perf_counter()
    sc()  # compiles (with whatever this process's cache holds)
    first = time.perf_counter() - t
    for fn in arms:  # one more of each: allocator and caches settle
        fn()
    times: list[list[float]] = [[] for _ in arms]
    for _ in range(reps):
        for fn, out in zip(arms, times, strict=True):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    te, tc = times[0], times[1]
    e, c = statistics.median(te), statistics.median(tc)
    tok = batch * seq
    gf = step_gflop(cfg, batch, seq)
    out = {
        "preset": preset,
        "precision": "bf16" if bf16 else "fp32",
        "eager_tok_s": tok / e,
        "compiled_tok_s": tok / c,
        "ratio": e / c,
        "eager_gflops": gf / e,
        "compiled_gflops": gf / c,
        "first_compiled_step_s": first,
        "ratio_min": min(te) / min(tc),
    }
    if with_hf:
        out["hf_tok_s"] = tok / statistics.median(times[2])
    return out


def child_compile_time(preset: str, batch: int, seq: int) -> None:
    """(In a child process) the first compiled step minus an eager one, per precision: JSON."""
    out = {}
    for bf16 in (False, True):
        cfg, eager, opt_e = build(preset, False)
        _, comp, opt_c = build(preset, True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
        se = make_step(eager, opt_e, ids, ids, bf16)
        sc = make_step(comp, opt_c, ids, ids, bf16)
        se()
        t = time.perf_counter()
        se()
        t_e = time.perf_counter() - t
        t = time.perf_counter()
        sc()
        out["bf16" if bf16 else "fp32"] = time.perf_counter() - t - t_e
    print(json.dumps(out))


def compile_times(preset: str, batch: int, seq: int, threads: int) -> dict:
    """Cold (empty cache folder) then warm (the same folder, a new process) compile seconds."""
    res = {}
    with tempfile.TemporaryDirectory(prefix="k2_inductor_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for kind in ("cold", "warm"):
            p = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    preset,
                    "--batch",
                    str(batch),
                    "--seq",
                    str(seq),
                    "--threads",
                    str(threads),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-compile-time", action="store_true")
    p.add_argument(
        "--transformers",
        action="store_true",
        help="also time transformers' eager step (same weights), interleaved",
    )
    p.add_argument("--only-compile-time", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        child_compile_time(args.child, args.batch, args.seq)
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
        f"fwd+bwd+AdamW, max-logit recording on; medians of {args.reps} interleaved reps"
    )
    print(
        f"{'preset':8}{'prec':6}{'eager tok/s':>12}{'comp tok/s':>12}{'ratio':>7}"
        f"{'min ratio':>10}{'eager GF/s':>12}{'comp GF/s':>11}{'bf16 mm GF/s':>14}"
        f"{'first comp step s':>19}"
    )
    for preset in args.presets.split(",") if not args.only_compile_time else []:
        from k2_core.configio import load_config

        mm = bf16_matmul_gflops(load_config(preset), args.batch * args.seq)
        for bf16 in (False, True):
            r = throughput(preset, bf16, args.batch, args.seq, args.reps, args.transformers)
            print(
                f"{preset:8}{r['precision']:6}{r['eager_tok_s']:12.0f}{r['compiled_tok_s']:12.0f}"
                f"{r['ratio']:7.2f}{r['ratio_min']:10.2f}{r['eager_gflops']:12.1f}"
                f"{r['compiled_gflops']:11.1f}{mm:14.0f}{r['first_compiled_step_s']:19.1f}",
                flush=True,
            )
            if args.transformers:
                print(
                    f"{'':14}transformers eager {r['hf_tok_s']:.0f} tok/s: k2 eager "
                    f"{r['eager_tok_s'] / r['hf_tok_s']:.2f}x, k2 compiled "
                    f"{r['compiled_tok_s'] / r['hf_tok_s']:.2f}x",
                    flush=True,
                )
    if not args.skip_compile_time:
        preset = args.presets.split(",")[0]
        ct = compile_times(preset, args.batch, args.seq, args.threads)
        for prec in ("fp32", "bf16"):
            print(
                f"compile time {preset} {prec}: cold {ct['cold'][prec]:.1f} s, "
                f"warm {ct['warm'][prec]:.1f} s (torch's cache, new process)"
            )


if __name__ == "__main__":
    main()
