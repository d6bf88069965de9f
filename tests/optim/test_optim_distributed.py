"""DistributedMuonClip over gloo (2 and 4 processes) equals single-process MuonClip on the
full batch; sharded state dicts merge into the single-process one."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from k2_optim import DistributedMuonClip, MuonClip, assign_owners, merge_state_dicts
from optim_helpers import TinyLM, plain_targets

STEPS, BATCH, SEQ, LR = 3, 8, 12, 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> TinyLM:
    torch.manual_seed(0)
    m = TinyLM()
    with torch.no_grad():
        m.attn.q_proj.weight.mul_(torch.linspace(1, 30, 32).unsqueeze(1))
    return m


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _loss(model, ids):
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _opt_kwargs(ns_dtype):
    return dict(lr=LR, weight_decay=0.1, adamw_lr=1e-2, qk_clip_tau=3.0, ns_dtype=ns_dtype)


def _worker(rank, world, port, ns_dtype, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    try:
        model = _model()
        opt = DistributedMuonClip(
            model, qk_clip_targets=plain_targets(model), **_opt_kwargs(ns_dtype)
        )
        per = BATCH // world
        clipped = []
        for ids in _batches():
            opt.zero_grad()
            _loss(model, ids[rank * per : (rank + 1) * per]).backward()
            opt.step()
            clipped.append(int(opt.last_clip_stats["heads_clipped"]))
        shard = opt.state_dict()
        assert set(shard["state"]) <= set(shard["owned_rows"]) and shard["world_size"] == world
        shards = [None] * world
        dist.all_gather_object(shards, shard)
        full = opt.consolidated_state_dict()
        # re-shard: a fresh optimizer loads the full dict and keeps only its own entries
        opt2 = DistributedMuonClip(
            model, qk_clip_targets=plain_targets(model), **_opt_kwargs(ns_dtype)
        )
        opt2.load_state_dict(full)
        assert set(opt2.state_dict()["state"]) == set(shard["state"])
        if rank == 0:
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "merged": merge_state_dicts(shards),
                    "full": full,
                    "clipped": clipped,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def test_assign_owners_balanced_and_deterministic():
    sizes = [100, 90, 50, 50, 40, 10, 10, 5]
    owners = assign_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= 10 and owners == assign_owners(sizes, 2)
    assert sorted(set(assign_owners(sizes, 4))) == [0, 1, 2, 3]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,ns_dtype", [(2, torch.float32), (4, torch.float32), (2, torch.bfloat16)]
)
def test_distributed_equals_single_process(tmp_path, world, ns_dtype):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(world, _free_port(), ns_dtype, out), nprocs=world, join=True)
    got = torch.load(out, weights_only=False)

    model = _model()
    opt = MuonClip(model, qk_clip_targets=plain_targets(model), **_opt_kwargs(ns_dtype))
    clipped = []
    for ids in _batches():
        opt.zero_grad()
        _loss(model, ids).backward()
        opt.step()
        clipped.append(int(opt.last_clip_stats["heads_clipped"]))
    assert clipped == got["clipped"] and sum(clipped) > 0
    tol = dict(atol=1e-5, rtol=1e-5) if ns_dtype == torch.float32 else dict(atol=2e-3, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["params"][n], p.detach(), **tol)
    ref = opt.state_dict()
    for merged in (got["merged"], got["full"]):
        assert set(merged["state"]) == set(ref["state"])
        for pid, st in ref["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    torch.testing.assert_close(merged["state"][pid][k], v, **tol)
                else:
                    assert merged["state"][pid][k] == v
    # the merged dict also loads into a single-process optimizer
    MuonClip(model, qk_clip_targets=plain_targets(model), **_opt_kwargs(ns_dtype)).load_state_dict(
        got["merged"]
    )
