"""Checkpoint I/O: k2's zarr store vs torch.save / torch.load on the same 512 MiB.

64 fp32 tensors of 8 MiB each, written to and read from local disk; cold-ish reads (the page
cache is dropped when possible). Prints seconds, MB/s and k2/torch ratios, with and without
checksum verification on load. Run: `uv run python bench/bench_checkpoint.py [--mib 512]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from k2_core.checkpoint import load_tensors, save_tensors


def drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        drop_caches()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    n = args.mib * (1 << 20) // 4 // args.tensors
    tensors = {f"layer.{i}.weight": torch.randn(n // 1024, 1024) for i in range(args.tensors)}
    mb = args.mib * 1.048576
    root = tempfile.mkdtemp(dir=os.environ.get("K2_BENCH_DIR"))
    pt, zr = os.path.join(root, "ck.pt"), os.path.join(root, "ck.zarr")
    try:
        t_save_pt = timed(lambda: torch.save(tensors, pt), args.reps)
        t_save_k2 = timed(lambda: save_tensors(zr, {"model": tensors}), args.reps)
        t_load_pt = timed(lambda: torch.load(pt, weights_only=True), args.reps)
        t_load_k2 = timed(lambda: load_tensors(zr), args.reps)
        t_load_k2_nock = timed(lambda: load_tensors(zr, verify=False), args.reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.mib} MiB in {args.tensors} fp32 tensors, local disk")
    print(f"{'':<28}{'seconds':>9}{'MB/s':>9}{'k2/torch time':>15}")
    rows = [
        ("torch.save", t_save_pt, None),
        ("k2 save (zarr, crc32)", t_save_k2, t_save_pt),
        ("torch.load", t_load_pt, None),
        ("k2 load, checksums", t_load_k2, t_load_pt),
        ("k2 load, no checksums", t_load_k2_nock, t_load_pt),
    ]
    for name, t, ref in rows:
        ratio = f"{t / ref:>15.2f}" if ref else ""
        print(f"{name:<28}{t:>9.3f}{mb / t:>9.0f}{ratio}")


if __name__ == "__main__":
    main()
