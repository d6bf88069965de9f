"""The packed loader: read amplification of a shuffled epoch, and its share of a `tiny` step.

Writes a packed store (random tokens, the layout of `k2 data prepare`: raw chunks of whole rows,
~8 MiB, plus `doc_starts` and the per-row index `row_docs`) to a temp dir, then:

1. Read amplification: bytes read from the store (counted by a local fsspec filesystem that
   counts every byte read through it) / bytes of the rows asked for, over the first
   `--amp-rows` rows of a shuffled epoch, batch 8, doc masking on. "before" is the loader's
   previous out-of-core path: zarr's orthogonal selection of each batch's rows (every chunk
   touched is read whole) after reading all of `doc_starts` at start-up; "after" is
   `PackedDataset` now (rows and document starts as byte ranges).
2. `tiny` training steps (batch 8 x 256, forward + backward + AdamW) fed by `PackedDataset` with
   doc masking, timing `next(loader)` against the whole step, and producing a batch without
   the prefetch thread.

Run: `uv run python bench/bench_loader.py [--steps 20] [--in-memory]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# the byte-counting filesystem the loader tests use
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
from k2data_testutil import counting_fs  # noqa: E402

CHUNK_BYTES = 8 << 20  # what `k2 data prepare` writes


def write_store(path: Path, n_seq: int, seq_len: int, vocab: int) -> None:
    import zarr

    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w")
    row = seq_len + 1
    for split, n in (("train", n_seq), ("val", max(8, n_seq // 50))):
        tokens = rng.integers(1, vocab, size=(n, row), dtype=np.uint32)
        lengths = rng.integers(20, 2 * seq_len, size=n * row // 20 + 1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = starts[starts < tokens.size].astype(np.int64)
        row_docs = np.searchsorted(starts, np.arange(n + 1) * row, side="left")
        g = root.create_group(split)
        chunk_rows = min(n, max(1, CHUNK_BYTES // (row * 4)))
        g.create_array(
            "tokens", shape=tokens.shape, dtype="uint32", chunks=(chunk_rows, row), compressors=None
        )[...] = tokens
        for name, arr in (("doc_starts", starts), ("row_docs", row_docs)):
            g.create_array(
                name,
                shape=arr.shape,
                dtype="int64",
                chunks=(min(1 << 20, arr.size),),
                compressors=None,
            )[...] = arr
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "k2-packed",
                "version": 2,
                "complete": True,
                "seq_len": seq_len,
                "eos_id": 0,
                "vocab_size": vocab,
            }
        )
    )


def amplification(store: Path, rows: int, seq_len: int) -> tuple[float, float]:
    """(before, after) read amplification over the first `rows` rows of a shuffled epoch."""
    import zarr
    from k2_data.loader import PackedDataset, PackedOptions

    counting = counting_fs()
    uri = f"k2count://{store}"
    options = PackedOptions(uri=uri, batch_size=8, doc_mask=True, prefetch=0, in_memory_max_mb=0)
    batches = -(-rows // 8)
    asked = batches * 8 * (seq_len + 1) * 4
    with PackedDataset(options) as ds:  # the same rows for both: this loader's order
        order = [ds._reader.rows_at(0, 8 * i)[0] for i in range(batches)]
    counting.read = 0
    group = zarr.open_group(uri, mode="r")["train"]
    np.asarray(group["doc_starts"][...])
    for r in order:
        group["tokens"].get_orthogonal_selection((np.sort(r), slice(None)))
    before = counting.read / asked
    with PackedDataset(options) as ds:
        counting.read = 0
        for _ in range(batches):
            next(ds)
        after = counting.read / asked
    return before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--n-seq", type=int, default=20_000)
    p.add_argument("--amp-rows", type=int, default=1024, help="rows of the shuffled epoch measured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--in-memory", action="store_true", help="read the split into memory first")
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
        print(
            f"store: {args.n_seq} x {args.seq + 1} tokens written in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        before, after = amplification(store, args.amp_rows, args.seq)
        print(
            f"read amplification over {args.amp_rows} shuffled rows (batch 8, doc masking): "
            f"before {before:.1f}x (zarr chunks), after {after:.3f}x (byte ranges)"
        )
        options = PackedOptions(
            uri=str(store),
            batch_size=args.batch,
            doc_mask=True,
            prefetch=4,
            in_memory_max_mb=2048 if args.in_memory else 0,
        )
        t0 = time.perf_counter()
        loader = PackedDataset(options)
        print(f"open: {time.perf_counter() - t0:.3f}s (in memory: {loader.in_memory})")

        def step(batch):
            out = model(
                batch["input_ids"],
                labels=batch["labels"],
                position_ids=batch["position_ids"],
                segment_ids=batch["segment_ids"],
            )
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
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(200):
            next(sync)
        produce = (time.perf_counter() - t0) / 200
        produce_cpu = (time.process_time() - c0) / 200  # steadier than wall time on a shared box
    step_ms = 1e3 * total / args.steps
    print(
        f"step {step_ms:.1f} ms; waiting on the loader {1e3 * wait / args.steps:.3f} ms/step "
        f"= {100 * wait / total:.3f}% of the step (target < 2%)"
    )
    print(
        f"producing one batch synchronously: {1e3 * produce:.3f} ms "
        f"= {100 * produce / (total / args.steps):.3f}% of a step ({1e3 * produce_cpu:.3f} ms CPU)"
    )


if __name__ == "__main__":
    main()
