"""Expert-parallel dispatch/combine (uneven all-to-all over gloo) equals the local MoE layer:
outputs, input gradients, expert / router / shared-expert gradients and the global load."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backend_runs import RoutingMargin

HIDDEN, INTER, EXPERTS, TOPK, SEQ = 32, 16, 8, 2, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moe():
    from k2_moe.moe import MoE
    from k2_moe.router import SigmoidRouter

    torch.manual_seed(0)
    router = SigmoidRouter(HIDDEN, EXPERTS, TOPK, routed_scaling_factor=2.5, initializer_range=0.5)
    moe = MoE(
        HIDDEN,
        INTER,
        EXPERTS,
        router,
        n_shared_experts=1,
        seq_aux_loss_coef=0.01,
        initializer_range=0.1,
    )
    with torch.no_grad():  # a skewed bias: uneven loads, so uneven all-to-all splits
        router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
    return moe.train()


def _inputs(world: int):
    g = torch.Generator().manual_seed(1)
    # rank r holds r + 1 sequences: token counts differ per rank too
    xs = [torch.randn(r + 1, SEQ, HIDDEN, generator=g) for r in range(world)]
    gs = [torch.randn(r + 1, SEQ, HIDDEN, generator=g) for r in range(world)]
    return xs, gs


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from k2_hw_h800.expert_parallel import apply_expert_parallel, expert_param_names
    from k2_hw_h800.mesh import build_layout
    from k2_hw_h800.options import H800Options

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    try:
        lay = build_layout(H800Options(ep=world), torch.device("cpu"))
        assert (lay.ep, lay.dp, lay.pp, lay.ep_rank) == (world, 1, 1, rank)
        xs, gs = _inputs(world)
        # reference: the whole batch through the unsharded layer
        ref = _moe()
        # EP routes each rank's rows in a smaller matmul than the whole batch's: a near-tie
        # could re-route a token on another CPU's kernels; this seed's inputs have none
        margin = RoutingMargin(ref)
        x_all = torch.cat([x.reshape(-1, HIDDEN) for x in xs]).requires_grad_(True)
        y_ref = ref(x_all)
        (y_ref * torch.cat([g.reshape(-1, HIDDEN) for g in gs])).sum().backward()
        margin.check(f"ep{world} reference")
        # expert parallel: this rank's tokens only
        moe = _moe()
        assert apply_expert_parallel(moe, lay.ep_rank, lay.ep, lay.ep_group) == 1
        assert expert_param_names(moe) == {"experts.gate_up_proj", "experts.down_proj"}
        local = EXPERTS // world
        assert moe.experts.gate_up_proj.shape[0] == local
        x = xs[rank].clone().requires_grad_(True)
        y = moe(x)
        (y * gs[rank]).sum().backward()
        start = sum(t.shape[0] * SEQ for t in xs[:rank])
        rows = slice(start, start + x.shape[0] * SEQ)
        tol = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.reshape(-1, HIDDEN), y_ref[rows], **tol)
        torch.testing.assert_close(x.grad.reshape(-1, HIDDEN), x_all.grad[rows], **tol)
        for name in ("gate_up_proj", "down_proj"):
            want = getattr(ref.experts, name).grad[rank * local : (rank + 1) * local]
            torch.testing.assert_close(getattr(moe.experts, name).grad, want, **tol)
        # replicated parts: each rank holds its tokens' share of the gradient; the sum is the whole
        for (n, p), (n2, p2) in zip(moe.named_parameters(), ref.named_parameters(), strict=True):
            assert n == n2
            if n.startswith("experts."):
                continue
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, p2.grad, **tol)
        counts = moe.expert_counts.clone()
        dist.all_reduce(counts)
        assert torch.equal(counts, ref.expert_counts)
        splits = torch.tensor([int(c) for c in counts.view(world, local).sum(1)])
        if rank == 0:
            torch.save({"splits": splits}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_ep_dispatch_combine_equals_local_moe(tmp_path, world):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    splits = torch.load(out)["splits"]
    assert len(set(splits.tolist())) > 1  # the splits really were uneven
