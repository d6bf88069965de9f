"""RL iteration time split (rollout, reward, training, weight sync) and weight-sync speed.

    uv run python bench/bench_rl.py [--iters 3] [--threads 2] [--json]

Part 1 runs `k2 rl` iterations (RLTrainer, the `rl-math` config: K=8 samples x 8 prompts,
segment 48 tokens, budget 96) on a `tiny`-preset model with random weights and a small BPE
tokenizer, and reports the median seconds of each phase and rollout tokens/s (KV-cache engine).
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


def _tiny_checkpoint(root: Path) -> str:
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.modelio import save_model
    from test_sft_fixtures import tiny_tokenizer

    tok = tiny_tokenizer(vocab=2048)
    cfg = load_config("tiny", [f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    uri = str(root / "init")
    save_model(model, uri)
    tok.save(f"{uri}/tokenizer")
    return uri


def bench_iterations(iters: int, root: Path) -> dict[str, float]:
    """Median seconds per phase of an RL iteration, and rollout / training tokens/s."""
    from k2_core.configio import load_config
    from k2_rl.commands import config_path
    from k2_rl.rl_stage import RLTrainer

    init = _tiny_checkpoint(root)
    cfg = load_config(config_path("rl-math"), [
        f"plugins.rl.init={init}", f"checkpoint.dir={root / 'rl'}", f"train.steps={iters}",
        "train.eval_every=0", f"checkpoint.every={iters}", "tracking.tracker=null",
        "data.options.builtin_n=50", "plugins.rl.partial_rollout=false"])
    trainer = RLTrainer(cfg)
    rows = []
    while trainer.run.step < iters:
        rows.append(trainer.iteration())
    keys = ["time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s",
            "rollout/tokens_per_s", "train/tokens_per_s", "rl/response_tokens"]
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
    from k2_data.generation.engine import Engine
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
    return {"model_mb": mb, "inprocess_ms_per_mb": statistics.median(times) * 1e3 / mb,
            "distributed_ms_per_mb": dist_s * 1e3 / (nbytes / 2**20), "distributed_buckets": buckets}


def main() -> None:
    """Run both parts and print a table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["iteration", "sync"], default=None, help="run one part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    it: dict[str, float] = {}
    if args.only != "sync":
        with tempfile.TemporaryDirectory() as d:
            it = bench_iterations(args.iters, Path(d))
    sync = bench_sync() if args.only != "iteration" else {}
    out = {"iteration": it, "sync": sync}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if sync:
        print(f"weight sync of {sync['model_mb']:.1f} MB: in-process "
              f"{sync['inprocess_ms_per_mb']:.2f} ms/MB, torch.distributed (gloo, "
              f"{sync['distributed_buckets']} buckets) {sync['distributed_ms_per_mb']:.2f} ms/MB")
    if not it:
        return
    total = sum(it[k] for k in ("time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s"))
    print(f"RL iteration (median of {args.iters}): {total:.2f} s")
    for k in ("time/rollout_s", "time/reward_s", "time/train_s", "time/sync_s"):
        print(f"  {k.split('/')[1][:-2]:<8} {it[k]:7.3f} s  ({100 * it[k] / total:4.1f}%)")
    print(f"  rollout {it['rollout/tokens_per_s']:,.0f} tokens/s (KV cache), training "
          f"{it['train/tokens_per_s']:,.0f} tokens/s, mean response {it['rl/response_tokens']:.0f} tokens")


if __name__ == "__main__":
    main()
