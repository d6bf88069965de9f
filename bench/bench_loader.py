"""The packed loader's share of a `tiny` training step (target: under 2%).

Writes a packed store (random tokens, the on-disk contract of `k2 data prepare`) to a temp dir,
then runs `tiny` training steps (batch 8 x 256, forward + backward + AdamW) fed by
`PackedDataset` with doc masking, timing `next(loader)` against the whole step.
Run: `uv run python bench/bench_loader.py [--steps 20] [--out-of-core]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_store(path: Path, n_seq: int, seq_len: int, vocab: int) -> None:
    import zarr

    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w")
    for split, n in (("train", n_seq), ("val", max(8, n_seq // 50))):
        tokens = rng.integers(1, vocab, size=(n, seq_len + 1), dtype=np.uint32)
        lengths = rng.integers(20, 2 * seq_len, size=n * (seq_len + 1) // 20 + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = starts[starts < tokens.size].astype(np.int64)
        g = root.create_group(split)
        g.create_array("tokens", shape=tokens.shape, dtype="uint32", chunks=(64, seq_len + 1))[...] = tokens
        g.create_array("doc_starts", shape=starts.shape, dtype="int64", chunks=(65536,))[...] = starts
    (path / "manifest.json").write_text(json.dumps(
        {"complete": True, "seq_len": seq_len, "eos_id": 0, "vocab_size": vocab}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--n-seq", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-of-core", action="store_true", help="read rows from the store, not memory")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from k2_core.configio import load_config
    from k2_core.errors import ConfigError
    from k2_core.model import build_model
    from k2_data.loader import PackedDataset, PackedOptions

    try:
        cfg = load_config("tiny")
    except ConfigError:  # `packed` not registered by k2_data.plugin yet: register it here
        from k2_core.plugins import get_registry
        from k2_data.loader import build_packed

        reg = get_registry()
        reg.register("dataset", "packed", build_packed, PackedOptions)
        cfg = load_config("tiny", registry=reg)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "packed"
        t0 = time.perf_counter()
        write_store(store, args.n_seq, args.seq, cfg.model.vocab_size)
        print(f"store: {args.n_seq} x {args.seq + 1} tokens written in {time.perf_counter() - t0:.1f}s")
        options = PackedOptions(uri=str(store), batch_size=args.batch, doc_mask=True, prefetch=4,
                                in_memory_max_mb=0 if args.out_of_core else 2048)
        t0 = time.perf_counter()
        loader = PackedDataset(options)
        print(f"open: {time.perf_counter() - t0:.3f}s (in memory: {loader.in_memory})")

        def step(batch):
            out = model(batch["input_ids"], labels=batch["labels"],
                        position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(next(loader))  # warm-up
        wait = total = 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            step(batch)
            t2 = time.perf_counter()
            wait += t1 - t0
            total += t2 - t0
        loader.close()
        # The loader's own cost without overlap: producing batches synchronously.
        sync = PackedDataset(options.model_copy(update={"prefetch": 0}))
        next(sync)
        t0 = time.perf_counter()
        for _ in range(200):
            next(sync)
        produce = (time.perf_counter() - t0) / 200
    step_ms = 1e3 * total / args.steps
    print(f"step {step_ms:.1f} ms; waiting on the loader {1e3 * wait / args.steps:.3f} ms/step "
          f"= {100 * wait / total:.3f}% of the step (target < 2%)")
    print(f"producing one batch synchronously: {1e3 * produce:.3f} ms "
          f"= {100 * produce / (total / args.steps):.3f}% of a step")


if __name__ == "__main__":
    main()
