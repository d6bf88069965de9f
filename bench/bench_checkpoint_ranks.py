"""Rank-parallel checkpoints: 4 processes each writing their share vs one process writing all.

A ~512 MiB training state (fp32): an expert stack [64, 512, 1024] split by expert (EP), an
embedding [32768, 1024] replicated (its chunks spread over the ranks) and its two AdamW moments
row-split by ZeRO owner. "1 writer" is the old way: one rank holds everything and writes it
(`save_tensors`); "4 ranks" are 4 processes with a ShardWriter each, then one commit. Then each
rank resumes: reads its rows under the same layout and under another one (3 ranks whose
optimizer rows ignore the chunk grid). Page cache dropped between phases when possible.

Run: `uv run python bench/bench_checkpoint_ranks.py [--mib 512] [--ranks 4]`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from k2_core.checkpoint import (
    CheckpointReader,
    ShardWriter,
    commit_sharded,
    save_tensors,
    split_rows,
    spread_rows,
)


def drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def shapes(mib: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """key -> (global shape, sharded?); four quarters of `mib` MiB of fp32."""
    rows = mib * (1 << 20) // 4 // 4 // 1024  # each tensor a quarter, 1024 wide
    return {
        "model/experts.w": ((64, rows // 64, 1024), True),
        "model/embed": ((rows, 1024), False),
        "optim/embed.exp_avg": ((rows, 1024), True),
        "optim/embed.exp_avg_sq": ((rows, 1024), True),
    }


def layout(mib: int, world: int) -> dict[int, list[tuple[str, int, int]]]:
    """Each rank's (key, first row, end row): sharded tensors split, replicated ones spread."""
    plan: dict[int, list[tuple[str, int, int]]] = {r: [] for r in range(world)}
    load = [0] * world
    spec = shapes(mib)
    for key, (shape, sharded) in spec.items():
        if sharded:
            for r, (a, b) in enumerate(split_rows(shape, world)):
                plan[r].append((key, a, b))
                load[r] += (b - a) * int(np.prod(shape[1:])) * 4
    replicated = {k: (s, torch.float32) for k, (s, sharded) in spec.items() if not sharded}
    for key, runs in spread_rows(replicated, world, load).items():
        for r, a, b in runs:
            plan[r].append((key, a, b))
    return plan


def rank_main(rank: int, uri: str, mib: int, world: int, barrier, results) -> None:
    """One rank: its shards in memory, a barrier, then its ShardWriter; reports bytes and time."""
    torch.set_num_threads(1)
    spec = shapes(mib)
    mine = layout(mib, world)[rank]
    local = {(k, a): torch.full((b - a, *spec[k][0][1:]), float(rank)) for k, a, b in mine}
    barrier.wait()
    t = time.perf_counter()
    with ShardWriter(uri, rank) as w:
        for (key, a), tensor in local.items():
            group, name = key.split("/", 1)
            w.write(group, name, spec[key][0], torch.float32, a, tensor)
    results.put((rank, w.bytes_written, time.perf_counter() - t))
    barrier.wait()


def save_ranks(uri: str, mib: int, world: int) -> tuple[float, list[tuple[int, float]], float]:
    """(wall seconds incl. commit, [(bytes, seconds)] per rank, commit seconds)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(world + 1), ctx.Queue()
    procs = [
        ctx.Process(target=rank_main, args=(r, uri, mib, world, barrier, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    barrier.wait()  # every rank holds its shards: the save starts now
    t = time.perf_counter()
    barrier.wait()  # every rank closed its writer
    tc = time.perf_counter()
    commit_sharded(uri, None, world, {"bench": True})
    done = time.perf_counter()
    per = sorted(results.get() for _ in range(world))
    for p in procs:
        p.join()
    return done - t, [(b, s) for _, b, s in per], done - tc


def resume_reads(uri: str, mib: int, world: int, aligned: bool) -> list[tuple[int, int]]:
    """(bytes read, bytes held) per rank when `world` ranks resume their rows from `uri`."""
    spec, out = shapes(mib), []
    for rank in range(world):
        reader, held = CheckpointReader(uri), 0
        for key, (shape, sharded) in spec.items():
            a, b = 0, shape[0]
            if sharded:
                if aligned:
                    a, b = split_rows(shape, world)[rank]
                else:
                    edges = np.linspace(0, shape[0], world + 1).astype(int)
                    a, b = int(edges[rank]), int(edges[rank + 1])
            reader.read_rows(*key.split("/", 1), a, b)
            held += (b - a) * int(np.prod(shape[1:])) * 4
        out.append((reader.bytes_read, held))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    spec = shapes(args.mib)
    total = sum(int(np.prod(s)) * 4 for s, _ in spec.values())
    root = tempfile.mkdtemp(dir=os.environ.get("K2_BENCH_DIR"))
    try:
        full = {}
        for key, (shape, _) in spec.items():
            full.setdefault(key.split("/", 1)[0], {})[key.split("/", 1)[1]] = torch.ones(shape)
        one, many = [], []
        for rep in range(args.reps):
            drop_caches()
            t = time.perf_counter()
            save_tensors(f"{root}/one{rep}", full, {"bench": True})
            one.append(time.perf_counter() - t)
            drop_caches()
            many.append(save_ranks(f"{root}/many{rep}", args.mib, args.ranks))
        del full
        drop_caches()
        same = resume_reads(f"{root}/many0", args.mib, args.ranks, aligned=True)
        drop_caches()
        other = resume_reads(f"{root}/many0", args.mib, args.ranks - 1, aligned=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = 1e6
    wall = statistics.median(m[0] for m in many)
    t_one = statistics.median(one)
    best = min(many, key=lambda m: m[0])
    share = total / args.ranks
    print(
        f"{total / mb:.0f} MB of fp32 state, {args.ranks} ranks, local disk, {os.cpu_count()} "
        f"cores, median of {args.reps}"
    )
    print(f"{'':<30}{'MB written':>11}{'x share':>9}{'seconds':>9}")
    print(f"{'1 writer (rank 0, all)':<30}{total / mb:>11.1f}{total / share:>9.2f}{t_one:>9.2f}")
    for r, (b, s) in enumerate(best[1]):
        print(f"{f'4 ranks: rank {r}':<30}{b / mb:>11.1f}{b / share:>9.3f}{s:>9.2f}")
    print(f"{'4 ranks: commit (rank 0)':<30}{'':>11}{'':>9}{best[2]:>9.2f}")
    print(
        f"{'4 ranks: wall, incl. commit':<30}{sum(b for b, _ in best[1]) / mb:>11.1f}{'':>9}"
        f"{wall:>9.2f}"
    )
    print(
        f"save time, 4 ranks / 1 writer: {wall / t_one:.2f}x wall; slowest rank's own "
        f"writing {max(s for _, s in best[1]) / t_one:.2f}x; most bytes on one rank "
        f"{max(b for b, _ in best[1]) / total:.3f}x of the 1 writer's"
    )
    print(f"{'resume':<30}{'MB read':>11}{'x held':>9}")
    for name, reads in (
        (f"same layout ({args.ranks} ranks)", same),
        (f"other layout ({args.ranks - 1}, unaligned)", other),
    ):
        for r, (b, held) in enumerate(reads):
            print(f"{f'{name} r{r}':<30}{b / mb:>11.1f}{b / held:>9.3f}")


if __name__ == "__main__":
    main()
