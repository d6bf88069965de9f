"""Decode benchmark: the `k2` generator's engine (MLA compressed KV cache) on the `tiny` preset.

1. Greedy, 256 new tokens after a 32- or 128-token prompt, batch 1 or 16: `Engine.generate`
   (prefill once, then one cached token per step) against recomputing the whole prefix with a
   full forward for every new token. Both produce the same tokens (checked); tokens/s, ratio.
2. Batched decode: `Engine.generate` with batch 1 / 4 / 16 / 64 (sampling at temperature 1,
   seeded), total generated tokens/s and the speed-up over batch 1.
Random weights (decode speed does not depend on training). Run:
`uv run python bench/bench_decode.py [--new 256] [--threads N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch


def _model():
    from k2_core.configio import load_config
    from k2_core.model import build_model

    cfg = load_config("tiny")
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@torch.inference_mode()
def recompute_decode(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy decoding of equal-length prompts with a full forward over prompt + generated
    tokens at every step (no cache)."""
    seq = torch.tensor(prompts)
    start = seq.shape[1]
    for _ in range(new):
        tok = model.lm_head(model.model(seq)[:, -1]).argmax(-1)  # the head on the last token only
        seq = torch.cat((seq, tok[:, None]), dim=1)
    return seq[:, start:].tolist()


@contextlib.contextmanager
def _moe_weight_gather():
    """Decode with the small-batch MoE form used on devices (gathering the chosen experts'
    weights) instead of the CPU's loop over pairs on weight views."""
    import k2_moe.moe as moe

    real = moe.small_batch_forward
    moe.small_batch_forward = functools.partial(real, on_host=False)
    try:
        yield
    finally:
        moe.small_batch_forward = real


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best (wall seconds, CPU seconds of this process) over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main() -> None:
    """Print the cache-vs-recompute table and the batch-scaling table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=256, help="new tokens per sequence")
    ap.add_argument(
        "--cases",
        type=lambda v: tuple(map(int, v.split("x"))),
        nargs="+",
        default=[(32, 1), (128, 1), (32, 16)],
        help="PROMPTxBATCH cases of the cache-vs-recompute table",
    )
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens of the batch table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is kept)")
    ap.add_argument(
        "--batches",
        default="1,4,16,64",
        help="batch sizes of the batch table (comma-separated; empty: no table)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from k2_data.inference import Engine, SamplingParams
    from k2_moe.experts import SMALL_BATCH_PAIRS

    model, cfg = _model()
    engine = Engine(model, max_batch_size=64)
    vocab = cfg.model.vocab_size
    g = torch.Generator().manual_seed(1)
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, seed=0))  # warm-up
    greedy = SamplingParams(temperature=0, max_new_tokens=args.new)

    print(
        f"tiny preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"{args.new} new tokens, greedy, {torch.get_num_threads()} threads"
    )
    print("(CPU s: this process's CPU time, robust to other jobs on a shared machine)")
    print(
        f"{'prompt':<7}{'batch':<6}{'method':<24}{'wall s':>8}{'tok/s':>8}{'ratio':>7}"
        f"{'CPU s':>8}{'tok/CPU s':>10}{'ratio':>7}"
    )
    for plen, bs in args.cases:
        prompts = torch.randint(0, vocab, (bs, plen), generator=g).tolist()
        outs = engine.generate(prompts, greedy)
        same = [o.token_ids for o in outs] == recompute_decode(model, prompts, args.new)
        w_cache, c_cache = _best(lambda p=prompts: engine.generate(p, greedy), args.repeats)
        w_full, c_full = _best(lambda p=prompts: recompute_decode(model, p, args.new), 1)
        rows = [("recompute full prefix", w_full, c_full), ("KV cache (engine)", w_cache, c_cache)]
        if bs * cfg.moe.num_experts_per_tok <= SMALL_BATCH_PAIRS:
            with _moe_weight_gather():  # the device form of the small-batch MoE, for comparison
                w_g, c_g = _best(lambda p=prompts: engine.generate(p, greedy), args.repeats)
            rows.append(("KV cache, MoE gather", w_g, c_g))
        for name, w, c in rows:
            n = bs * args.new
            print(
                f"{plen:<7}{bs:<6}{name:<24}{w:>8.2f}{n / w:>8.1f}{w_full / w:>7.2f}"
                f"{c:>8.2f}{n / c:>10.1f}{c_full / c:>7.2f}"
            )
        print(f"{'':<13}same tokens: {same}", flush=True)
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches:
        return
    print()
    print(
        f"{'batch':<7}{'wall s':>8}{'tok/s':>9}{'x b=1':>7}"
        f"{'CPU s':>8}{'tok/CPU s':>10}{'x b=1':>7}"
    )
    base = None
    for bs in batches:
        prompts = torch.randint(0, vocab, (bs, args.prompt), generator=g).tolist()
        params = [
            SamplingParams(temperature=1.0, max_new_tokens=args.new, seed=i) for i in range(bs)
        ]
        w, c = _best(lambda p=prompts, s=params: engine.generate(p, s), args.repeats)
        rate, crate = bs * args.new / w, bs * args.new / c
        base = base or (rate, crate)
        print(
            f"{bs:<7}{w:>8.2f}{rate:>9.1f}{rate / base[0]:>7.2f}{c:>8.2f}{crate:>10.1f}"
            f"{crate / base[1]:>7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
