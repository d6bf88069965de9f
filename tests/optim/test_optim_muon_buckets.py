"""Muon's bounded-bucket step: the same update for any bucket size, taller-than-wide
`muon_split` blocks (issue 17) and the DeepSpeed directions path."""

from __future__ import annotations

import copy

import pytest
import torch
from k2_optim import Muon, MuonClip, newton_schulz
from optim_helpers import TinyLM, plain_targets
from torch import nn


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 10), generator=g)
        opt.zero_grad()
        out = model(ids)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_bucket_size_does_not_change_the_update(nesterov):
    models = []
    for _ in range(2):  # the same seed, not deepcopy: that drops `muon_split`
        torch.manual_seed(0)
        models.append(TinyLM())
    ref, small = models
    kw = dict(lr=0.02, adamw_lr=1e-2, qk_clip_tau=3.0, ns_dtype=torch.float32, nesterov=nesterov)
    # 1 byte: every matrix (and every expert of a 3-D stack) is its own bucket
    opts = [
        MuonClip(m, qk_clip_targets=plain_targets(m), bucket_bytes=b, **kw)
        for m, b in ((ref, 1 << 30), (small, 1))
    ]
    _train(ref, opts[0])
    _train(small, opts[1])
    for (n, a), b in zip(ref.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=n)
    for pa, pb in zip(ref.parameters(), small.parameters(), strict=True):
        for k, v in opts[0].state[pa].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(opts[1].state[pb][k], v, atol=1e-6, rtol=1e-6)


def test_split_blocks_taller_than_wide():
    # issue 17: (4, 96, 16) with muon_split=2 is 8 blocks of 48 x 16, orthogonalised
    # transposed; the result used to be .view()-ed while non-contiguous
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 96, 16))
    w.muon_split = 2
    start = w.detach().clone()
    w.grad = torch.randn(4, 96, 16)
    opt = Muon([w], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    opt.step()
    blocks = newton_schulz(w.grad.reshape(8, 48, 16), dtype=torch.float32).reshape(4, 96, 16)
    expect = start - 0.1 * 0.2 * 48**0.5 * blocks
    torch.testing.assert_close(w.detach(), expect, atol=1e-5, rtol=1e-5)


def test_directions_path_matches_step():
    # the bucketed directions that DeepSpeedMuonClip writes into .grad are the step's update
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 96, 16))
    w.muon_split = 2
    v = nn.Parameter(torch.randn(32, 24))
    grads = [torch.randn_like(w), torch.randn_like(v)]
    a = [nn.Parameter(w.detach().clone()), nn.Parameter(v.detach().clone())]
    a[0].muon_split = 2
    opt_a = Muon(a, lr=0.1, weight_decay=0.0, ns_dtype=torch.float32, bucket_bytes=1)
    opt_b = Muon([w, v], lr=0.1, weight_decay=0.0, ns_dtype=torch.float32, bucket_bytes=1)
    for p, g in zip(a, grads, strict=True):
        p.grad = g.clone()
    opt_a.step()
    group = opt_b.param_groups[0]
    with torch.no_grad():
        for p, g in zip((w, v), grads, strict=True):
            p.grad = g.clone()
        for idxs, outs, scale in opt_b._directions(group, [w, v]):
            for i, o in zip(idxs, outs, strict=True):
                p = (w, v)[i]
                assert o.shape == p.shape
                p.add_(o, alpha=-0.1 * scale)
    torch.testing.assert_close(w.detach(), a[0].detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v.detach(), a[1].detach(), atol=1e-6, rtol=1e-6)


def test_bucket_bytes_must_be_positive():
    with pytest.raises(ValueError, match="bucket_bytes"):
        Muon([nn.Parameter(torch.randn(4, 4))], bucket_bytes=0)


def test_tall_matrices_iterate_in_their_own_layout():
    # X^T X and X B on a tall matrix are the transposed iteration's numbers, no copies made
    torch.manual_seed(0)
    g = torch.randn(3, 96, 40)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        tall = newton_schulz(g, dtype=dtype).float()
        wide = newton_schulz(g.mT.contiguous(), dtype=dtype).mT.float()
        torch.testing.assert_close(tall, wide, atol=tol, rtol=tol)


def test_workspace_is_reused_and_holds_no_state():
    # buckets of different shapes share one workspace; it is kept between steps (no fresh
    # allocation per step), freeing it changes nothing, and it never enters the state dict
    def make():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(4, 96, 16))
        w.muon_split = 2
        return [
            w,
            nn.Parameter(torch.randn(32, 24)),
            nn.Parameter(torch.randn(24, 32)),
            nn.Parameter(torch.randn(24, 32)),
        ]

    a, b = make(), make()
    opt_a = Muon(a, lr=0.05, bucket_bytes=1024)
    opt_b = Muon(b, lr=0.05, bucket_bytes=1024)
    g = torch.Generator().manual_seed(1)
    arenas = None
    for step in range(3):
        for pa, pb in zip(a, b, strict=True):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
        opt_b.free_workspace()
        assert opt_b.workspace.nbytes() == 0
        held = {k: v.data_ptr() for k, v in opt_a.workspace._arenas.items()}
        if step:
            assert held == arenas  # the same memory, step after step
        arenas = held
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)
    # bounded by the buckets: the stacked update (<= 1 KiB here, or one whole matrix) plus
    # two NS iterates and two Gram matrices per bucket
    assert 0 < opt_a.workspace.nbytes() < 16 << 10
    assert {k for st in opt_a.state_dict()["state"].values() for k in st} == {"momentum_buffer"}
    # a loaded state continues exactly as the uninterrupted run
    c = make()
    opt_c = Muon(c, lr=0.05, bucket_bytes=1024)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # else the two share momenta
    for pa, pc in zip(a, c, strict=True):
        with torch.no_grad():
            pc.copy_(pa)
        pc.grad = pa.grad = torch.randn(pa.shape, generator=g)
    opt_a.step()
    opt_c.step()
    for pa, pc in zip(a, c, strict=True):
        torch.testing.assert_close(pc, pa, atol=0, rtol=0)
