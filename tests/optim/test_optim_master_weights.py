"""BF16 weights with FP32 master weights and `main_grad` buffers (the h800 default policy)."""

from __future__ import annotations

import torch
from k2_optim import MuonClip
from k2_optim.muon import Muon, grad_of
from torch import nn


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    with torch.no_grad():  # bf16-representable starting weights: both runs start equal
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m.to(dtype)


def _grads(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def test_master_weights_follow_the_fp32_update():
    """With FP32 gradients in main_grad, the master copy of a BF16 model steps exactly as an
    FP32 model does, and the BF16 weights are the master rounded."""
    ref, low = _model(torch.float32), _model(torch.bfloat16)
    for p in low.parameters():
        p.main_grad = torch.zeros(p.shape)
    o_ref, o_low = Muon(ref, lr=0.02), Muon(low, lr=0.02)
    for step in range(3):
        for p, q, g in zip(ref.parameters(), low.parameters(), _grads(ref, step), strict=True):
            p.grad = g.clone()
            q.main_grad.copy_(g)
        o_ref.step()
        o_low.step()
        o_low.zero_grad()
    for p, q in zip(ref.parameters(), low.parameters(), strict=True):
        st = o_low.state[q]
        assert st["master"].dtype == torch.float32 and q.dtype == torch.bfloat16
        assert all(
            v.dtype == torch.float32 for k, v in st.items() if torch.is_tensor(v) and k != "step"
        )
        torch.testing.assert_close(st["master"], p.detach(), rtol=0, atol=0)
        assert torch.equal(q.detach(), p.detach().to(torch.bfloat16))
        assert not q.main_grad.any()  # zero_grad zeroes the buffers


def test_grad_of_prefers_main_grad():
    p = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    p.grad = torch.ones(2, dtype=torch.bfloat16)
    assert grad_of(p) is p.grad
    p.main_grad = torch.full((2,), 3.0)
    assert grad_of(p) is p.main_grad


def test_master_state_survives_a_state_dict_round_trip():
    """torch casts loaded state to the parameter's dtype; master-weight state stays FP32."""
    low = _model(torch.bfloat16)
    for p, g in zip(low.parameters(), _grads(low, 1), strict=True):
        p.main_grad = g
    opt = Muon(low, lr=0.02)
    opt.step()
    sd = opt.state_dict()
    again = Muon(low, lr=0.02)
    again.load_state_dict(sd)
    for p in low.parameters():
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and k != "step":
                assert again.state[p][k].dtype == torch.float32
                assert torch.equal(again.state[p][k], v)


def test_qk_clip_scales_the_master_too():
    """QK-Clip's rescaling reaches the FP32 master, or the next step would undo it."""
    from k2_optim.qkclip import QKClipTarget

    q = nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    q.main_grad = torch.zeros(4, 3)
    ml = torch.tensor([200.0, 10.0])
    target = QKClipTarget(
        max_logits=lambda: ml,
        q_weight=q,
        k_weight=None,
        heads=2,
        q_sqrt_rows=(),
        q_gamma_rows=slice(None),
    )
    opt = MuonClip([q], lr=0.0, weight_decay=0.0, qk_clip_tau=100.0, qk_clip_targets=[target])
    opt.step()
    master = opt.state[q]["master"]
    assert torch.allclose(master[:2], torch.full((2, 3), 0.5)) and torch.equal(
        master[2:], torch.ones(2, 3)
    )
    assert torch.equal(q.detach().float(), master)


def test_init_state_allocates_up_front_and_steps_the_same():
    """init_state() claims masters and moments before the first step (the h800 bf16 policy
    calls it so step temporaries cannot fragment the heap under them); the steps are unchanged."""
    lazy_m, eager_m = _model(torch.bfloat16), _model(torch.bfloat16)
    lazy, eager = Muon(lazy_m, lr=0.02), Muon(eager_m, lr=0.02)
    eager.init_state()
    for p in eager_m.parameters():
        st = eager.state[p]
        assert st["master"].dtype == torch.float32 and torch.equal(st["master"], p.detach().float())
        assert ("momentum_buffer" in st) != ("exp_avg" in st)
    for step in range(2):
        for a, b, g in zip(
            lazy_m.parameters(), eager_m.parameters(), _grads(lazy_m, step), strict=True
        ):
            a.grad, b.grad = g.to(torch.bfloat16), g.to(torch.bfloat16)
        lazy.step()
        eager.step()
    for a, b in zip(lazy_m.parameters(), eager_m.parameters(), strict=True):
        assert torch.equal(a, b)
        for k, v in lazy.state[a].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(eager.state[b][k])), k
