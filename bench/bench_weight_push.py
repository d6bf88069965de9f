"""GB/s of a weight push from 4 sharded trainer ranks to 2 engine processes, and k2-1t scaled.

Four gloo trainer ranks of the h800 backend at DP2 x EP2 (`build_run` on the `tiny` preset
grown to ~50 M parameters) push to two engine processes on 127.0.0.1 with
`k2_rl.weight_push` (weights in the h800 backend's dtype policy; each rank streams its
checkpoint share to both engines in crc32-checked buckets; rank 0 commits after a barrier).
One warm-up push, then `--pushes` timed ones; the figure is model bytes / push wall time
(median), checksums, staging and the switch included.

Scaled to k2-1t on the report's cluster (256 nodes of 8 H800, PP16 x EP16 x DP8, BF16 weights):
`k2_hw_h800.plan.make_plan` and `memory.stage_state` give each GPU's share of the weights (its
experts over their DP replicas, the rest over the stage's DP x EP ranks: what a rank pushes).
Assumption: every GPU pushes its share over its own NIC at once, either at the rate one
trainer rank reached here (bytes it put on the wire / push time) or at the NIC's 400 Gbps;
the busiest GPU sets the time. Two fan-outs: one engine copy (engines relay among themselves,
as the report's checkpoint engine broadcasts), or every engine replica fed directly
(replicas of `--engine-gpus` GPUs on the same 2048 GPUs, so each GPU sends its share to
2048 / engine-gpus replicas). Printed beside the report's "< 30 s for a full update".

Run: `uv run python bench/bench_weight_push.py [--pushes 3] [--bucket-mb 16] [--dtype bf16]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

MODEL = [  # ~50 M parameters: ~100 MB of BF16 (~200 MB of FP32) weights
    "model.num_hidden_layers=4",
    "model.hidden_size=512",
    "model.intermediate_size=1024",
    "model.num_attention_heads=4",
    "model.q_lora_rank=128",
    "model.kv_lora_rank=64",
    "model.qk_nope_head_dim=32",
    "model.qk_rope_head_dim=16",
    "model.v_head_dim=32",
    "moe.moe_intermediate_size=512",
    "moe.n_routed_experts=16",
    "moe.num_experts_per_tok=2",
    "train.micro_batch_size=1",
    "train.eval_every=0",
    "tracking.tracker=null",
]
ENV = {"K2_LOAD_PLUGINS": "optim,moe,data,hw_h800", "OMP_NUM_THREADS": "1"}
REPORT_S = 30.0  # K2 report: a full update of the 1T model in under 30 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(conn, cache: str) -> None:
    """An engine process: the whole model and a receiver; exits when the parent says so."""
    from k2_core.configio import load_config
    from k2_core.model import K2ForCausalLM
    from k2_core.plugins import get_registry
    from k2_core.weight_push import WeightReceiver
    from k2_data.inference.engine import Engine

    os.environ.update(ENV, K2_CACHE_DIR=cache)
    torch.set_num_threads(1)
    cfg = load_config("tiny", MODEL)
    model = K2ForCausalLM(cfg.model, cfg.moe, get_registry(), init_weights=False)
    with WeightReceiver(Engine(model, max_batch_size=1)) as recv:
        conn.send(recv.address)
        conn.recv()
        conn.send(recv.version)


def _trainer(
    rank: int,
    world: int,
    port: int,
    cache: str,
    engines: list,
    pushes: int,
    bucket_mb: float,
    out: str,
    extra: list[str],
) -> None:
    import torch.distributed as dist
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run
    from k2_core.weight_push import WeightPusher

    os.environ.update(
        ENV,
        K2_CACHE_DIR=cache,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        run = build_run(
            load_config(
                "tiny",
                [
                    *MODEL,
                    "parallel.backend=h800",
                    "parallel.options.ep=2",
                    f"checkpoint.dir={os.path.dirname(out)}/ckpt",
                    *extra,
                ],
            )
        )
        sharding = run.backend.checkpoint_sharding(run.model, run.optimizer)
        pusher = WeightPusher([tuple(a) for a in engines], bucket_mb=bucket_mb)
        pusher.push(run.model, 1, sharding=sharding)  # warm-up
        times = []
        for v in range(2, pushes + 2):
            dist.barrier()
            t0 = time.perf_counter()
            pusher.push(run.model, v, sharding=sharding)
            times.append(time.perf_counter() - t0)
        with open(f"{out}.{rank}", "w") as f:
            dtype = str(next(p.dtype for p in run.model.parameters() if not p.is_meta))
            json.dump(
                {
                    "times": times,
                    "bytes": pusher.last.bytes,
                    "dtype": dtype,
                    "buckets": pusher.last.buckets,
                    "per_rank": pusher.last.per_rank_bytes,
                },
                f,
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(
    pushes: int, bucket_mb: float, extra: list[str], engines_n: int = 2, world: int = 4
) -> dict:
    """Push wall times and bytes of `world` trainer ranks to `engines_n` engine processes."""
    tmp = tempfile.mkdtemp(prefix="k2-bench-push-")
    cache, out = os.path.join(tmp, "cache"), os.path.join(tmp, "res")
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(engines_n):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_engine, args=(theirs, cache), daemon=True)
        p.start()
        pipes.append(mine)
        procs.append(p)
    try:
        addrs = [list(c.recv()) for c in pipes]
        mp.start_processes(
            _trainer,
            args=(world, _free_port(), cache, addrs, pushes, bucket_mb, out, extra),
            nprocs=world,
            join=True,
            start_method="fork",
        )
        for c in pipes:
            c.send("version")
        versions = [c.recv() for c in pipes]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    res = [json.load(open(f"{out}.{r}")) for r in range(world)]
    wall = [max(r["times"][i] for r in res) for i in range(pushes)]
    return {
        "wall": wall,
        "bytes": [r["bytes"] for r in res],
        "buckets": [r["buckets"] for r in res],
        "engines": engines_n,
        "versions": versions,
        "dtype": res[0]["dtype"],
    }


def k2_1t_shares() -> tuple[float, float, int]:
    """(largest, mean) BF16 weight bytes a GPU pushes of k2-1t at PP16 x EP16 x DP8 on the
    report's 256 H800 nodes, and the GPU count."""
    from k2_core.configio import load_config
    from k2_hw_h800.cluster import cluster_preset
    from k2_hw_h800.plan import PlanOptions, make_plan

    cfg = load_config("k2-1t", [], check={"model", "moe"})
    cluster = cluster_preset("h800", 256)
    best = make_plan(cfg.model, cfg.moe, cluster, PlanOptions(pp=16, ep=16)).best
    assert (best.pp, best.ep, best.dp) == (16, 16, 8), (best.pp, best.ep, best.dp)
    shares = [s.checkpoint - s.optimizer for s in best.states]  # the BF16 weights it writes
    return max(shares), statistics.mean(shares), cluster.gpus


def main() -> None:
    """Measure, scale, print side by side."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=16.0)
    ap.add_argument(
        "--engine-gpus",
        type=int,
        default=32,
        help="GPUs of one engine replica of k2-1t (fan-out to every replica)",
    )
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="the trainers' parallel.options.dtype (default: the backend's)",
    )
    args = ap.parse_args()

    m = measure(
        args.pushes, args.bucket_mb, [f"parallel.options.dtype={args.dtype}"] if args.dtype else []
    )
    model = sum(m["bytes"])
    wall = statistics.median(m["wall"])
    wire = model * m["engines"]  # every engine receives the whole model
    per_rank = max(m["bytes"]) * m["engines"] / wall  # the busiest rank's outbound rate
    print(
        f"measured: {model / 1e6:.0f} MB model ({m['dtype']}), "
        "4 trainer ranks (h800 DP2 x EP2, gloo) "
        f"-> {m['engines']} engine processes over TCP on 127.0.0.1, {args.bucket_mb:g} MiB "
        f"buckets, {os.cpu_count()} CPU cores"
    )
    print(
        f"  per-rank shares {[round(b / 1e6, 1) for b in m['bytes']]} MB, buckets "
        f"{m['buckets']}, engine versions after {args.pushes + 1} pushes {m['versions']}"
    )
    print(f"  push wall time {wall:.3f} s (median of {[round(w, 3) for w in m['wall']]})")
    print(
        f"  {model / wall / 1e9:.3f} GB/s of model per push, {wire / wall / 1e9:.3f} GB/s "
        f"into the engines, {per_rank / 1e9:.3f} GB/s out of the busiest rank"
    )

    share, mean_share, gpus = k2_1t_shares()
    nic = 400e9 / 8
    replicas = gpus // args.engine_gpus
    print(
        f"k2-1t, 256 x 8 H800, PP16 x EP16 x DP8: a GPU pushes {share / 1e9:.2f} GB of BF16 "
        f"weights (largest; mean {mean_share / 1e9:.2f} GB), {gpus} GPUs at once"
    )
    print(f"{'fan-out':<44}{'rate per GPU':>16}{'full update':>14}{'report':>10}{'ratio':>8}")
    for fan, label in (
        (1, "one engine copy (engines relay)"),
        (replicas, f"{replicas} replicas of {args.engine_gpus} GPUs, fed directly"),
    ):
        for rate, rname in ((per_rank, "measured/rank"), (nic, "400 Gbps NIC")):
            t = share * fan / rate
            print(
                f"{label:<44}{rate / 1e9:>9.2f} GB/s{'':>1}{t:>12.1f} s{'< 30 s':>10}"
                f"{t / REPORT_S:>7.2f}x  ({rname})"
            )


if __name__ == "__main__":
    main()
