"""ZeRO-1 step on 2 gloo processes: k2 (DistributedMuonClip, the `h800` backend's engine=k2) and
K2's MuonClip inside DeepSpeed ZeRO-1 (DeepSpeedMuonClip, engine=deepspeed) vs DeepSpeed ZeRO-1
with its own Muon (`"optimizer": {"type": "Muon"}` -> MuonWithAuxAdam).

Both train the same model (the `tiny` preset, `--layers` layers, seeded identically) on the
same batch per rank, with the same parameter split (k2_optim.param_groups: matrices on Muon,
embeddings / head / router / norms on AdamW). Per step, timed separately (median over --reps
after --warmup steps):
- `fwd+bwd`: forward and backward (DeepSpeed's ZeRO-1 gradient reduction runs at the end of
  `engine.backward`, k2's inside `optimizer.step()`, so compare the sums);
- `step`: the optimizer step (k2: gradient all-reduce, Newton-Schulz / AdamW of the owned
  rows (balanced row ownership), row all-gather, QK-Clip with max logits all-reduced; k2-ds:
  gradient all-reduce (the backend's, before clipping), Newton-Schulz of this rank's
  partition's matrices, DeepSpeed's ZeRO-1 update of its fp32 partition and all-gather,
  QK-Clip; DeepSpeed: its ZeRO-1 Muon step and all-gather).
The ratios printed are k2 / DeepSpeed and k2-ds / DeepSpeed for `fwd+bwd+step` (target <= 1.0x),
and k2's optimizer-state bytes per rank (max/mean).

DeepSpeed's first CPU start JIT-compiles an extension into TORCH_EXTENSIONS_DIR (~25 s, once).

Run: `uv run python bench/bench_zero1.py [--layers 2] [--reps 5] [--seq 256]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LR, WD = 3e-3, 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(layers: int):
    from k2_core.configio import load_config
    from k2_core.model import build_model

    torch.manual_seed(0)
    cfg = load_config(
        "tiny", [f"model.num_hidden_layers={layers}", "tracking.tracker=null"], check=set()
    )
    return build_model(cfg).train(), cfg


def _batch(rank: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _groups(model):
    from k2_optim import param_groups

    return param_groups(model, LR, WD, None, None, router_on_adamw=True, no_decay_1d=True)


def _timed_steps(args, model, batch, step, zero_grad) -> tuple[list[float], list[float]]:
    """(forward+backward seconds, optimizer seconds) of each measured step after the warm-up."""
    fb, st = [], []
    for _ in range(args.warmup + args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        model(**batch, return_logits=False).loss.backward()
        t1 = time.perf_counter()
        step()
        zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        fb.append(t1 - t0)
        st.append(t2 - t1)
    return fb[args.warmup :], st[args.warmup :]


def _time_k2(args, rank: int) -> tuple[tuple[list[float], list[float]], list[int]]:
    """(fwd+bwd and step times, optimizer-state bytes of every rank) of k2's ZeRO-1."""
    from k2_optim.distributed import DistributedMuonClip

    model, cfg = _model(args.layers)
    opt = DistributedMuonClip(_groups(model), LR, WD, model=model, qk_clip_tau=100.0)
    times = _timed_steps(
        args, model, _batch(rank, args.seq, cfg.model.vocab_size), opt.step, opt.zero_grad
    )
    # the balanced row ownership: optimizer-state bytes held by every rank
    held: list = [None] * dist.get_world_size()
    dist.all_gather_object(held, opt.state_bytes())
    return times, held


def _average_grads(model) -> None:
    """What the h800 backend does before step() with engine=deepspeed: one flat fp32 all-reduce."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))


def _time_k2_deepspeed(args, rank: int) -> tuple[list[float], list[float]]:
    from k2_optim import MuonClip

    model, cfg = _model(args.layers)
    opt = MuonClip(_groups(model), LR, WD, model=model, qk_clip_tau=100.0).deepspeed()
    opt.initialize(model, {"zero_optimization": {"stage": 1}})

    def step() -> None:
        _average_grads(model)
        opt.step()

    return _timed_steps(
        args, model, _batch(rank, args.seq, cfg.model.vocab_size), step, opt.zero_grad
    )


def _time_deepspeed(args, rank: int) -> tuple[list[float], list[float]]:
    import deepspeed

    model, cfg = _model(args.layers)
    groups = _groups(model)
    for g in groups:
        for p in g["params"]:
            p.use_muon = bool(g["use_muon"])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "Muon", "params": {"lr": LR, "momentum": 0.95, "weight_decay": WD}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    batch = _batch(rank, args.seq, cfg.model.vocab_size)
    fb, st = [], []
    for _ in range(args.warmup + args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(**batch, return_logits=False).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        fb.append(t1 - t0)
        st.append(t2 - t1)
    return fb[args.warmup :], st[args.warmup :]


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        k2_times, state_bytes = _time_k2(args, rank)
        res = {"k2": k2_times}
        if not args.skip_deepspeed:
            res["k2-ds"] = _time_k2_deepspeed(args, rank)
            res["deepspeed"] = _time_deepspeed(args, rank)
        if rank == 0:  # plain JSON: timings only, nothing to unpickle
            with open(out, "w") as f:
                json.dump({"times": res, "k2_state_bytes": state_bytes}, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    """Spawn the 2 ranks, time both engines, print the table and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="TORCHDYNAMO_DISABLE=1: DeepSpeed's Muon runs eager (its torch.compile "
        "of Newton-Schulz takes many minutes on a small CPU); k2 never compiles",
    )
    args = ap.parse_args()
    if args.no_compile:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    os.environ.setdefault("K2_LOAD_PLUGINS", "optim,moe")
    out = f"/tmp/bench_zero1_{os.getpid()}.json"
    mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
    with open(out) as f:
        got = json.load(f)
    os.remove(out)
    res, held = got["times"], got["k2_state_bytes"]
    med = {k: (statistics.median(fb), statistics.median(st)) for k, (fb, st) in res.items()}
    print(
        f"tiny preset, {args.layers} layers, 2 gloo ranks x 1 x {args.seq} tokens, "
        f"{args.threads} thread(s) per rank; median of {args.reps}"
    )
    print(f"{'engine':<10} {'fwd+bwd ms':>11} {'step ms':>9} {'total ms':>9}")
    for k, (fb, st) in med.items():
        print(f"{k:<10} {fb * 1e3:>11.1f} {st * 1e3:>9.1f} {(fb + st) * 1e3:>9.1f}")
    mean = sum(held) / len(held)
    print(
        f"k2 optimizer state per rank: {', '.join(f'{b / 2**20:.1f}' for b in held)} MiB "
        f"(max/mean {max(held) / mean:.3f})"
    )
    if "deepspeed" in med:
        ds = med["deepspeed"]
        for k in ("k2", "k2-ds"):
            print(
                f"{k} / deepspeed (fwd+bwd+step): {sum(med[k]) / sum(ds):.2f}x; "
                f"step only: {med[k][1] / ds[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
