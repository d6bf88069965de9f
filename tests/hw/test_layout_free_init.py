"""Deferred, layout-free initialisation under the `h800` backend: every rank materialises only
what it trains (its stage's layers, its experts), each tensor drawn from a generator seeded by
(seed, name, expert), so the consolidated initial weights are bit-identical to one process's
under DP2, EP4, DP2 x EP2 and PP2 x EP2, and other stages' layers are never allocated."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from backend_runs import free_port, small_model

LAYOUTS = {
    "dp2": (2, []),
    "ep4": (4, ["ep=4"]),
    "dp2xep2": (4, ["ep=2"]),
    "pp2xep2": (4, ["pp=2", "ep=2"]),
}
OVERRIDES = [*small_model(4), "moe.n_routed_experts=8", "tracking.tracker=null"]


def _worker(rank: int, world: int, port: int, opts: list[str], out: str) -> None:
    import torch.distributed as dist
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.model.init import EXPERT_OFFSET_ATTR
    from k2_core.plugins import get_plugins
    from safetensors.torch import save_file

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        K2_LOAD_PLUGINS="optim,moe,data,hw_h800",
    )
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            "tiny",
            [
                *OVERRIDES,
                "parallel.backend=h800",
                "parallel.options.dtype=fp32",
                *[f"parallel.options.{o}" for o in opts],
            ],
        )
        reg = get_plugins().registry
        backend = reg.build("backend", "h800", options=cfg.parallel.options)
        model = backend.parallelize(build_model(cfg, reg, device="meta"), cfg.train.seed)
        held, offsets = {}, {}
        for name, p in model.named_parameters():
            if not p.is_meta:
                held[name] = p.detach().contiguous()
                offsets[name] = str(getattr(p, EXPERT_OFFSET_ATTR, 0))
            else:
                assert not p.requires_grad, name  # another stage's: frozen, never optimised
        save_file(held, f"{out}/rank{rank}.safetensors", metadata=offsets)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_initial_weights_are_layout_free(tmp_path, layout):
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from safetensors import safe_open

    world, opts = LAYOUTS[layout]
    mp.start_processes(
        _worker,
        args=(world, free_port(), opts, str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    want = dict(build_model(load_config("tiny", OVERRIDES)).named_parameters())
    got: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    per_rank = []
    for r in range(world):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            offsets = f.metadata()
            names = list(f.keys())
            per_rank.append(sum(f.get_slice(n).get_shape()[0] for n in names))
            for n in names:
                t, lo = f.get_tensor(n), int(offsets[n])
                full = got.setdefault(n, torch.full_like(want[n], float("nan")))
                seen = covered.setdefault(n, torch.zeros(want[n].shape[0], dtype=torch.bool))
                rows = slice(lo, lo + t.shape[0])
                if seen[rows].any():  # a replica: must agree bit for bit
                    assert torch.equal(full[rows], t), n
                full[rows] = t
                seen[rows] = True
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert covered[n].all(), n
        assert torch.equal(got[n], w.detach()), n
    if "pp=2" in opts:  # each stage holds only its layers: no rank holds every tensor
        held = [set() for _ in range(world)]
        for r in range(world):
            with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
                held[r] = set(f.keys())
        assert all(len(h) < len(want) for h in held)
        assert not any("embed_tokens" in n for n in held[world - 1])
