"""One-GPU BF16 training step of a ~1B-parameter K2-shaped model, with the planner's memory.

The `small` preset (1.0B total / 0.2B active parameters, MLA, 64 routed experts top-4, one
shared expert, one dense first layer) with BF16 weights, under each activation policy:
forward (logits) + cross-entropy + backward + AdamW step. Prints tokens/s, MFU against the
chip's BF16 peak (model FLOPs as the planner counts them: 6 x non-embedding active params +
causal attention), peak memory, and the planner's memory prediction next to the measured
figures: saved activations per micro-batch (k2_hw_h800.memory vs measure_saved_bytes) and the
step's peak (parameters + grads + AdamW state + activations + logits, vs
torch.cuda.max_memory_allocated).

Run: `uv run python bench/bench_gpu_step.py` on a machine with CUDA (unchanged). Without
one it says so and exits; `--cpu` runs a reduced config (the `tiny` preset, short sequences)
on the CPU instead, where MFU is against a measured BF16 matmul rate.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

PEAK_TFLOPS = {
    "H800": 989.0,
    "H100": 989.0,
    "H200": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}


def chip_peak(device: torch.device, override: float | None) -> tuple[str, float]:
    """(name, dense BF16 FLOP/s) of the device."""
    if override:
        return "given", override * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name.upper():
                return name, tf * 1e12
        sys.exit(f"unknown GPU {name!r}: pass --peak-tflops")
    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    return "cpu (measured bf16 matmul)", 10 * 2 * 1024**3 / (time.perf_counter() - t0)


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Benchmark each policy and print a table."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.params import count_parameters
    from k2_core.plugins import get_registry
    from k2_hw_h800.activations import POLICY_LEVELS, apply_activation_policy, measure_saved_bytes
    from k2_hw_h800.memory import layer_activation_bytes
    from k2_hw_h800.plan import model_flops_per_token

    cfg = load_config(args.preset, args.overrides, check={"model", "moe"})
    m, moe = cfg.model, cfg.moe
    seq, batch = args.seq or cfg.data.seq_len, args.batch
    tokens = batch * seq
    chip, peak = chip_peak(device, args.peak_tflops)
    counts = count_parameters(m, moe)
    flops = model_flops_per_token(m, moe, seq) * tokens
    print(
        f"{args.preset}: {counts['total'] / 1e9:.3f}B params ({counts['active'] / 1e9:.3f}B "
        f"active), {batch} x {seq} tokens, {chip}, peak {peak / 1e12:.3g} TFLOP/s"
    )
    torch.manual_seed(0)
    model = build_model(cfg, get_registry(), device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, m.vocab_size, (batch, seq), device=device)
    labels = torch.roll(ids, -1, dims=1)

    def step() -> torch.Tensor:
        logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(
        f"{'policy':22s} {'tok/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'plan GB':>8s} "
        f"{'saved MB':>9s} {'plan MB':>9s} {'host MB':>8s} {'loss':>8s}"
    )
    for name in args.policies:
        pol = POLICY_LEVELS[name]
        apply_activation_policy(model, pol)
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        # memory: one more step from a clean peak counter
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        peak_txt = f"{peak_mem / 1e9:8.2f}" if peak_mem else f"{'n/a':>8s}"
        saved = measure_saved_bytes(model, lambda: model(ids))
        meas_dev = sum(v.device for v in saved.values())
        meas_host = sum(v.host for v in saved.values())
        pred = [layer_activation_bytes(m, moe, i, tokens, pol) for i in range(m.num_hidden_layers)]
        pred_dev = sum(p.device for p in pred)
        # static: bf16 params + bf16 grads + two bf16 AdamW moments; the head keeps bf16
        # logits, their fp32 copy and its softmax for the loss, and the logits' gradient
        logits = tokens * m.vocab_size
        plan_peak = 2 * n_params * 4 + pred_dev + logits * (2 + 4 + 4 + 2)
        print(
            f"{name:22s} {tokens / dt:10.0f} {flops / dt / peak:6.1%} {peak_txt} "
            f"{plan_peak / 1e9:8.2f} {meas_dev / 1e6:9.1f} {pred_dev / 1e6:9.1f} "
            f"{meas_host / 1e6:8.1f} {loss.item():8.4f}"
        )


def main() -> None:
    """Parse arguments and run on CUDA, or on the CPU with --cpu."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run a reduced config on the CPU")
    ap.add_argument("--preset", default=None, help="preset (default small; tiny with --cpu)")
    ap.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq", type=int, default=None, help="sequence length")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the chip's BF16 peak")
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["none", "recompute", "recompute+fp8", "recompute+fp8+offload"],
    )
    args = ap.parse_args()
    if args.cpu:
        torch.set_num_threads(2)
        args.preset = args.preset or "tiny"
        args.batch, args.seq = args.batch or 2, args.seq or 128
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        run(args, torch.device("cpu"))
        return
    if not torch.cuda.is_available():
        print("bench_gpu_step needs a CUDA GPU; none found (use --cpu for a reduced CPU run)")
        return
    args.preset = args.preset or "small"
    args.batch, args.seq = args.batch or 8, args.seq or 4096
    run(args, torch.device("cuda"))


if __name__ == "__main__":
    main()
