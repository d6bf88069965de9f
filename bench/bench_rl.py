"""RL iteration time split (rollout, reward, training, weight sync) and weight-sync speed.

    uv run python bench/bench_rl.py [--iters 3] [--threads 2] [--engine both] [--json]

Part 1 runs `k2 rl` iterations (RLTrainer, the `rl-math` config: K=8 samples x 8 prompts,
segment 48 tokens, budget 96) on a `tiny`-preset model with random weights and a small BPE
tokenizer, and reports the median seconds of each phase and rollout tokens/s (KV-cache engine),
once per engine mode: `colocated` (engine in the trainer process, in-memory weight copy) and
`process` (engine in a child process, weights by gloo broadcast), with each mode's weight sync
in ms per MB.
Part 2 times one weight push of the same model in-process (`engine.load_weights`) and as a
bucketed broadcast over torch.distributed (gloo, 2 local processes), in ms per MB.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "rl"))


def tiny_checkpoint(root: Path) -> tuple[str, object]:
    """A saved `tiny` model (vocab of a small BPE) with its tokenizer beside it:
    (uri, tokenizer)."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.modelio import save_model
    from rl_fixtures import tiny_tokenizer

    tok = tiny_tokenizer(vocab=2048)
    cfg = load_config("tiny", [f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    uri = str(root / "init")
    save_model(model, uri)
    tok.save(f"{uri}/tokenizer")
    return uri, tok


def bench_iterations(iters: int, root: Path, engine: str = "colocated") -> dict[str, float]:
    """Median seconds per phase of an RL iteration, rollout / training tokens/s, sync ms/MB."""
    from k2_core.configio import load_config
    from k2_rl.commands import config_path
    from k2_rl.rl_stage import RLTrainer

    init, _ = tiny_checkpoint(root)
    cfg = load_config(
        config_path("rl-math"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={root / 'rl'}",
            f"train.steps={iters}",
            "train.eval_every=0",
            f"checkpoint.every={iters}",
            "tracking.tracker=null",
            "data.options.builtin_n=50",
            "plugins.rl.partial_rollout=false",
            f"plugins.rl.engine={engine}",
        ],
    )
    trainer = RLTrainer(cfg)
    rows = []
    try:
        while trainer.run.step < iters:
            rows.append(trainer.iteration())
            rows[-1]["sync/ms_per_mb"] = (
                trainer.sync.last_seconds * 1e3 / (trainer.sync.last_bytes / 2**20)
            )
    finally:
        trainer.close()
    keys = [
        "time/rollout_s",
        "time/reward_s",
        "time/train_s",
        "time/sync_s",
        "sync/ms_per_mb",
        "rollout/tokens_per_s",
        "train/tokens_per_s",
        "rl/response_tokens",
    ]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, port: int, reps: int, q) -> None:
    import torch.distributed as dist
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_rl.weight_sync import DistributedSync, sync_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = build_model(load_config("tiny"))
    sync = DistributedSync(src=0, bucket_mb=32)
    times = []
    template = sync_state(model)
    for v in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            sync.send(model, v)
        else:
            sync.receive_state(template)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put((statistics.median(times), sync.last_bytes, sync.buckets))
    dist.destroy_process_group()


def bench_sync(reps: int = 5) -> dict[str, float]:
    """ms per MB of one weight push: in-process engine load vs gloo bucketed broadcast."""
    import torch.multiprocessing as mp
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_data.inference.engine import Engine
    from k2_rl.weight_sync import InProcessSync

    model = build_model(load_config("tiny"))
    engine = Engine(build_model(load_config("tiny")))
    sync = InProcessSync(engine)
    times = []
    for v in range(reps):
        sync.push(model, v)
        times.append(sync.last_seconds)
    mb = sync.last_bytes / 2**20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, port, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    dist_s, nbytes, buckets = q.get(timeout=600)
    for p in procs:
        p.join()
    return {
        "model_mb": mb,
        "inprocess_ms_per_mb": statistics.median(times) * 1e3 / mb,
        "distributed_ms_per_mb": dist_s * 1e3 / (nbytes / 2**20),
        "distributed_buckets": buckets,
    }


def main() -> None:
    """Run both parts and print a table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["iteration", "sync"], default=None, help="run one part")
    ap.add_argument(
        "--engine",
        choices=["colocated", "process", "both"],
        default="both",
        help="engine mode(s) of the iteration part",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = ["colocated", "process"] if args.engine == "both" else [args.engine]
    its: dict[str, dict[str, float]] = {}
    if args.only != "sync":
        for mode in modes:
            with tempfile.TemporaryDirectory() as d:
                its[mode] = bench_iterations(args.iters, Path(d), mode)
    sync = bench_sync() if args.only != "iteration" else {}
    out = {"iteration": its, "sync": sync}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if sync:
        print(
            f"weight sync of {sync['model_mb']:.1f} MB: in-process "
            f"{sync['inprocess_ms_per_mb']:.2f} ms/MB, torch.distributed (gloo, "
            f"{sync['distributed_buckets']} buckets) {sync['distributed_ms_per_mb']:.2f} ms/MB"
        )
    if not its:
        return
    phases = ("time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s")
    print(f"RL iteration split (median of {args.iters} iterations) by engine mode:")
    print(f"  {'phase':<8}" + "".join(f"{m:>22}" for m in its))
    for k in (*phases, None):
        cells = []
        for it in its.values():
            total = sum(it[p] for p in phases)
            v = it[k] if k else total
            cells.append(f"{v:8.3f} s ({100 * v / total:5.1f}%)")
        label = k.split("/")[1][:-2] if k else "total"
        print(f"  {label:<8}" + "".join(f"{c:>22}" for c in cells))
    for mode, it in its.items():
        print(
            f"  {mode}: weight sync {it['sync/ms_per_mb']:.2f} ms/MB, rollout "
            f"{it['rollout/tokens_per_s']:,.0f} tokens/s (KV cache), training "
            f"{it['train/tokens_per_s']:,.0f} tokens/s, mean response "
            f"{it['rl/response_tokens']:.0f} tokens"
        )


if __name__ == "__main__":
    main()
