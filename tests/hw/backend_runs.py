"""Shared by the h800 backend tests: in-process reference runs and spawned gloo layouts."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp


def small_model(layers: int = 2) -> list[str]:
    """Overrides shrinking the `tiny` preset to the MoE model every backend test trains."""
    return [
        f"model.num_hidden_layers={layers}", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
        "moe.moe_intermediate_size=32", "moe.n_routed_experts=8", "moe.num_experts_per_tok=2",
    ]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_env(cache: str) -> None:
    """Process-wide settings of a run (tests/hw/conftest.py restores them after a module)."""
    os.environ.update(K2_CACHE_DIR=cache, K2_LOAD_PLUGINS="optim,moe,data,hw_h800",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def train_losses(shrink: list[str], overrides: list[str]) -> list[float]:
    """Train the shrunk `tiny` preset in this process; the logged losses."""
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run, train

    run = build_run(load_config("tiny", [*shrink, *overrides]))
    train(run)
    return [h["train/loss"] for h in run.history]


def _worker(rank: int, world: int, port: int, cache: str, shrink: list[str],
            overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    use_env(cache)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        losses = train_losses(shrink, ["parallel.backend=h800", *overrides])
        with open(f"{out}.{rank}", "w") as f:
            json.dump(losses, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def distributed_losses(world: int, cache: str, shrink: list[str], overrides: list[str],
                       out: str) -> list[list[float]]:
    """Train under the h800 backend on `world` spawned gloo processes; each rank's losses."""
    mp.spawn(_worker, args=(world, free_port(), cache, shrink, overrides, out), nprocs=world,
             join=True)
    per_rank = []
    for r in range(world):
        with open(f"{out}.{r}") as f:
            per_rank.append(json.load(f))
    return per_rank
