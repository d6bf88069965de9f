"""The planner's activation memory against measured saved-activation bytes.

For the `tiny` and `small` presets (BF16 weights and activations), each activation policy
(none, recompute, +FP8 storage, +CPU offload): one forward with grad enabled, the bytes each
decoder layer keeps for its backward (k2_hw_h800.activations.measure_saved_bytes: storages
deduplicated, parameters excluded; "device" = kept where the layer ran, "host" = offloaded)
against k2_hw_h800.memory.layer_activation_bytes. Prints a side-by-side table per layer kind
(the dense first layer and a MoE layer) and the largest deviation; the target is 10%.

Run: `uv run python bench/bench_planner.py [--presets tiny small] [--layers 3] [--batch 2]`.
Per-layer figures do not depend on the layer count, so `--layers` (default 3: one dense and
two MoE layers) only saves time; `--layers 0` keeps the preset's depth.
"""

from __future__ import annotations

import argparse
import time

import torch


def run_preset(name: str, layers: int, batch: int, seq: int | None) -> list[tuple]:
    """Rows (preset, layer, kind, policy, measured, predicted) for one preset."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.plugins import get_registry
    from k2_hw_h800.activations import POLICY_LEVELS, apply_activation_policy, measure_saved_bytes
    from k2_hw_h800.memory import layer_activation_bytes

    overrides = [f"model.num_hidden_layers={layers}"] if layers else []
    cfg = load_config(name, overrides, check={"model", "moe"})
    seq = seq or cfg.data.seq_len
    torch.manual_seed(0)
    model = build_model(cfg, get_registry(), dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq))
    dense = cfg.model.first_k_dense_replace
    # the first dense layer also owns the rotary tables every layer shares; take the last
    # dense layer and the last MoE layer as the representatives
    picks = (
        {"dense": dense - 1, "moe": cfg.model.num_hidden_layers - 1}
        if dense
        else {"moe": cfg.model.num_hidden_layers - 1}
    )
    rows = []
    for pname, pol in POLICY_LEVELS.items():
        apply_activation_policy(model, pol)
        t0 = time.perf_counter()
        got = measure_saved_bytes(model, lambda: model(ids))
        dt = time.perf_counter() - t0
        for kind, layer in picks.items():
            pred = layer_activation_bytes(cfg.model, cfg.moe, layer, batch * seq, pol)
            rows.append(
                (
                    name,
                    layer,
                    kind,
                    pname,
                    got[layer].device,
                    pred.device,
                    got[layer].host,
                    pred.host,
                    dt,
                )
            )
    return rows


def main() -> None:
    """Print the table for each preset and the worst deviation."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--layers", type=int, default=3, help="decoder layers built (0: the preset's)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(
        f"{'preset':6s} {'layer':>5s} {'kind':5s} {'policy':22s} {'measured MB':>12s} "
        f"{'planner MB':>11s} {'diff':>7s} {'host meas':>10s} {'host plan':>10s} {'diff':>7s}"
    )
    worst = 0.0
    for name in args.presets:
        for preset, layer, kind, pol, dev, pdev, host, phost, _dt in run_preset(
            name, args.layers, args.batch, args.seq
        ):
            d1 = pdev / dev - 1 if dev else 0.0
            d2 = phost / host - 1 if host else (0.0 if not phost else 1.0)
            worst = max(worst, abs(d1), abs(d2))
            print(
                f"{preset:6s} {layer:5d} {kind:5s} {pol:22s} {dev / 1e6:12.3f} "
                f"{pdev / 1e6:11.3f} {100 * d1:+6.2f}% {host / 1e6:10.3f} {phost / 1e6:10.3f} "
                f"{100 * d2:+6.2f}%"
            )
    print(f"largest deviation: {100 * worst:.2f}% (target: within 10%)")


if __name__ == "__main__":
    main()
