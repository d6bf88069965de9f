"""Rollout tokens/s through `k2 serve` (plugins.rl.engine=openai) beside the in-process engine.

    uv run python bench/bench_openai_rollout.py [--samples 64] [--tokens 48] [--threads 1] [--json]

Builds a `tiny`-preset model with random weights and a small BPE tokenizer, starts `k2 serve`
on it (127.0.0.1, a free port), and samples `--samples` responses of exactly `--tokens` tokens
(ignore_eos, temperature 1, one seed per sample) to K2-style math prompts:
- in-process: one `Engine.generate` call (the colocated engine, batches of 64);
- through k2 serve: `OpenAIEngine.generate` (one HTTP request per sample, the server's batcher
  joins concurrent requests into engine batches) at several `concurrency` settings;
and one checked weight update (write the checkpoint, drain, load, compare log-probabilities).
Reports tokens/s (median of 3) and the update's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "rl"))
sys.path.insert(0, str(ROOT / "tests" / "data"))
sys.path.insert(0, str(ROOT / "bench"))


def _median_rate(fn, tokens: int, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = fn()
        times.append(time.perf_counter() - t0)
        assert sum(len(o.token_ids) for o in outs) == tokens, "unexpected response lengths"
    return tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from k2_core.modelio import load_model
    from k2_data.inference.engine import Engine, SamplingParams
    from k2_rl.engine_openai import OpenAIEngine, OpenAISync
    from k2_rl.options import OpenAIEngineOptions, TaskOptions
    from k2_rl.prompts import PromptStream
    from k2_rl.rl_eval import prompt_encoder
    from serve_fixture import start_server, stop_server

    out: dict[str, object] = {
        "samples": args.samples,
        "tokens_per_sample": args.tokens,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from bench_rl import tiny_checkpoint  # the same init checkpoint as bench_rl

        uri, tok = tiny_checkpoint(root)
        stream = PromptStream((TaskOptions(name="math"),), prompt_encoder(tok), 0, args.tokens)
        prompts = [next(stream)[1] for _ in range(args.samples)]
        params = [
            SamplingParams(temperature=1.0, max_new_tokens=args.tokens, ignore_eos=True, seed=i)
            for i in range(args.samples)
        ]
        total = args.samples * args.tokens
        model = load_model(uri)
        local = Engine(model, tok, max_batch_size=64)
        out["in_process_tokens_per_s"] = _median_rate(
            lambda: local.generate(prompts, params), total
        )
        os.environ["K2_BENCH_KEY"] = "bench"
        proc, base = start_server(
            uri,
            "--weights-root",
            str(root),
            "--max-batch-size",
            "64",
            env={"K2_SERVE_API_KEY": "bench", "OMP_NUM_THREADS": str(args.threads)},
        )
        try:
            rates = {}
            for c in args.concurrency:
                engine = OpenAIEngine(
                    OpenAIEngineOptions(
                        base_url=f"{base}/v1", api_key_env="K2_BENCH_KEY", concurrency=c
                    )
                )
                try:
                    rates[c] = _median_rate(lambda e=engine: e.generate(prompts, params), total)
                finally:
                    engine.close()
            out["k2_serve_tokens_per_s"] = {str(c): r for c, r in rates.items()}
            engine = OpenAIEngine(
                OpenAIEngineOptions(base_url=f"{base}/v1", api_key_env="K2_BENCH_KEY")
            )
            try:
                sync = OpenAISync(engine, str(root / "weights"), prompts[:2])
                secs = []
                for v in (1, 2, 3):
                    sync.push(model, v)
                    secs.append(sync.last_seconds)
                out["update_s"] = statistics.median(secs)
                out["update_mb"] = sync.last_bytes / 2**20
                out["update_logprob_gap"] = sync.last_check
            finally:
                engine.close()
        finally:
            stop_server(proc)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{args.samples} samples x {args.tokens} tokens, {args.threads} threads")
    print(f"  in-process engine: {out['in_process_tokens_per_s']:8.0f} tokens/s")
    for c, r in out["k2_serve_tokens_per_s"].items():
        print(f"  k2 serve, concurrency {c:>3}: {r:8.0f} tokens/s")
    print(
        f"  checked weight update: {out['update_s']:.2f} s for {out['update_mb']:.1f} MiB "
        f"(logprob gap {out['update_logprob_gap']:.1g})"
    )


if __name__ == "__main__":
    main()
