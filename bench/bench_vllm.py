"""Greedy tokens/s and log-probability agreement: vLLM (CPU build) vs `k2 serve`, same weights.

    scripts/setup_vllm.sh                      # once: vLLM's venv outside the clone
    uv run python bench/bench_vllm.py [--samples 32] [--tokens 64] [--concurrency 1 8 32]
                                      [--threads 1] [--hidden 64] [--json]

Builds a model with K2's attention shape (kv_lora_rank 512, qk_rope_head_dim 64, so vLLM's CPU
MLA kernels run; `--hidden` sets the residual width, the rest stays tiny) with random weights,
saves it as a k2 checkpoint, `k2 export-hf`s it, and serves the checkpoint with `k2 serve` and
the export with vLLM (`python -m vllm.entrypoints.openai.api_server`, float32, raw
log-probabilities, `-cc '{"custom_ops":["-rotary_embedding"]}'`), both on 127.0.0.1 with
`--threads` OpenMP threads. Then, through the same client (`OpenAIEngine.generate`, one HTTP
request per sample, `concurrency` in flight), `--samples` greedy completions of exactly
`--tokens` tokens (ignore_eos) from random prompts, per concurrency: tokens/s (median of 3),
side by side with the ratio vLLM / k2 serve. Agreement: greedy tokens equal between the two,
and the largest |logprob difference| of vLLM's and k2 serve's against the trainer's own
(`trainer_logprobs`, one full forward). A script, not a timed test: see docs/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "rl"))
sys.path.insert(0, str(ROOT / "tests" / "data"))


def _rate(fn, reps: int = 3) -> tuple[float, list]:
    times, outs = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = fn()
        times.append(time.perf_counter() - t0)
    return sum(len(o.token_ids) for o in outs) / statistics.median(times), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from k2_core.model import build_model
    from k2_core.modelio import save_model
    from k2_data.inference.engine import SamplingParams
    from k2_rl.engine_openai import OpenAIEngine, trainer_logprobs
    from k2_rl.options import OpenAIEngineOptions
    from rl_fixtures import tiny_tokenizer
    from serve_fixture import start_server, stop_server
    from test_vllm_engine import (
        MODEL,
        export_hf,
        free_port,
        k2_shaped_configs,
        start_vllm,
        stop_vllm,
        vllm_python,
        wait_vllm,
    )

    py, reason = vllm_python()
    if py is None:
        sys.exit(f"bench_vllm: {reason}")
    out: dict[str, object] = {
        "samples": args.samples,
        "tokens_per_sample": args.tokens,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = tiny_tokenizer(vocab=512)
        mcfg, moe = k2_shaped_configs(tok.vocab_size)
        mcfg = mcfg.model_copy(
            update={"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
        )
        torch.manual_seed(0)
        model = build_model((mcfg, moe)).eval()
        out["parameters"] = sum(p.numel() for p in model.parameters())
        ckpt, export = str(root / "ckpt"), str(root / "hf")
        save_model(model, ckpt)
        tok.save(f"{ckpt}/tokenizer")
        export_hf(ckpt, export)

        g = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(3, tok.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 24, (args.samples,), generator=g)
        ]
        params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens, ignore_eos=True)

        def measure(base: str, model_name: str | None, key_env: str | None) -> tuple[dict, list]:
            rates, outs = {}, []
            for c in args.concurrency:
                engine = OpenAIEngine(
                    OpenAIEngineOptions(
                        base_url=f"{base}/v1",
                        model=model_name,
                        api_key_env=key_env,
                        concurrency=c,
                        timeout_s=600,
                    )
                )
                try:
                    engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=2))
                    rates[str(c)], outs = _rate(lambda e=engine: e.generate(prompts, params))
                finally:
                    engine.close()
            return rates, outs

        # k2 serve on the checkpoint
        t0 = time.perf_counter()
        proc, base = start_server(
            ckpt,
            "--max-batch-size",
            "64",
            timeout_s=600,
            env={"OMP_NUM_THREADS": str(args.threads)},
        )
        out["k2_serve_start_s"] = time.perf_counter() - t0
        try:
            k2_rates, k2_outs = measure(base, None, None)
        finally:
            stop_server(proc)

        # vLLM on the export
        port, pidfile, log = free_port(), root / "vllm.pid", root / "vllm.log"
        t0 = time.perf_counter()
        start_vllm(py, export, port, pidfile, log, threads=args.threads)
        try:
            wait_vllm(port, pidfile, log)
            out["vllm_start_s"] = time.perf_counter() - t0
            v_rates, v_outs = measure(f"http://127.0.0.1:{port}", MODEL, None)
        finally:
            stop_vllm(pidfile, port)

    same = sum(a.token_ids == b.token_ids for a, b in zip(v_outs, k2_outs, strict=True))
    gap_v = gap_k = gap_vk = 0.0
    for v, k in zip(v_outs, k2_outs, strict=True):
        mine = trainer_logprobs(model, v.prompt_ids, v.token_ids)
        gap_v = max(gap_v, max(abs(a - b) for a, b in zip(v.logprobs, mine, strict=True)))
        mine_k = trainer_logprobs(model, k.prompt_ids, k.token_ids)
        gap_k = max(gap_k, max(abs(a - b) for a, b in zip(k.logprobs, mine_k, strict=True)))
        if v.token_ids == k.token_ids:
            gap_vk = max(
                gap_vk, max(abs(a - b) for a, b in zip(v.logprobs, k.logprobs, strict=True))
            )
    out.update(
        k2_serve_tokens_per_s=k2_rates,
        vllm_tokens_per_s=v_rates,
        samples_same_tokens=same,
        max_logprob_diff_vllm_vs_trainer=gap_v,
        max_logprob_diff_k2_serve_vs_trainer=gap_k,
        max_logprob_diff_vllm_vs_k2=gap_vk,
    )
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(
        f"{args.samples} greedy samples x {args.tokens} tokens, {args.threads} thread(s) per "
        f"server, K2-shaped MLA model of {out['parameters']:,} parameters (float32, CPU)"
    )
    print(f"  {'concurrency':>11}  {'k2 serve':>10}  {'vLLM':>10}  {'vLLM / k2':>9}  (tokens/s)")
    for c in v_rates:
        print(
            f"  {c:>11}  {k2_rates[c]:10.0f}  {v_rates[c]:10.0f}  {v_rates[c] / k2_rates[c]:9.2f}"
        )
    print(f"  greedy tokens equal: {same}/{args.samples} samples")
    print(
        f"  max |logprob diff|: vLLM vs trainer {gap_v:.2g}, k2 serve vs trainer {gap_k:.2g}, "
        f"vLLM vs k2 serve {gap_vk:.2g}"
    )
    print(f"  start: k2 serve {out['k2_serve_start_s']:.0f} s, vLLM {out['vllm_start_s']:.0f} s")


if __name__ == "__main__":
    main()
