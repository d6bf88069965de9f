"""The K1.5 objective: hand-computed values and gradients, tau=0, exclusions; budget; schedule."""

from __future__ import annotations

import math

import pytest
import torch
from k2_rl.budget import apply_budget, budget_for, penalised
from k2_rl.objective import k15_loss, sequence_logprob, token_logprobs
from k2_rl.temperature import temperature_at


def test_hand_computed_value_and_gradient():
    # one prompt, K=2: rewards 1 and 0 -> advantages +0.5, -0.5
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.0])
    out = k15_loss(logp, old, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), tau=0.5)
    # terms: (0.5 - 0.5*0.5)^2 = 0.0625 and (-0.5 - 0)^2 = 0.25 -> mean 0.15625
    assert out.loss.item() == pytest.approx(0.15625)
    out.loss.backward()
    # dL/dlogp_i = 1/K * 2 * (a_i - tau*lr_i) * (-tau)
    assert logp.grad.tolist() == pytest.approx([-0.125, 0.25])
    assert out.advantage.tolist() == pytest.approx([0.5, -0.5])
    assert out.log_ratio.tolist() == pytest.approx([0.5, 0.0])


def test_tau_zero_is_squared_advantage_and_groups_are_separate():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    logp = torch.randn(6)
    out = k15_loss(logp, torch.randn(6), r, g, tau=0.0)
    a0 = r[:3] - r[:3].mean()
    a1 = r[3:] - r[3:].mean()
    want = ((a0**2).mean() + (a1**2).mean()) / 2
    assert out.loss.item() == pytest.approx(want.item())


def test_excluded_samples_leave_mean_and_loss():
    logp = torch.zeros(4, requires_grad=True)
    r = torch.tensor([1.0, 0.0, 100.0, 5.0])
    valid = torch.tensor([True, True, False, True])
    g = torch.tensor([0, 0, 0, 1])  # group 1 has a single sample: no baseline
    out = k15_loss(logp, torch.zeros(4), r, g, tau=1.0, valid=valid)
    assert out.valid.tolist() == [True, True, False, False]
    assert out.loss.item() == pytest.approx(0.25)  # ((0.5)^2 + (-0.5)^2) / 2, one group
    out.loss.backward()
    assert logp.grad[2:].tolist() == [0.0, 0.0]


def test_gradient_matches_autograd_through_a_model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 11)

    class M(torch.nn.Module):
        def forward(self, ids, return_logits=True):
            return type("O", (), {"logits": emb(ids)})()

    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    lp, ent = token_logprobs(M(), ids, mask)
    ref = torch.log_softmax(emb(ids[:, :-1]), -1)
    assert lp[0, 2].item() == pytest.approx(ref[0, 1, 3].item(), abs=1e-6)
    assert lp[0, 3].item() == pytest.approx(ref[0, 2, 4].item(), abs=1e-6)
    assert lp[1, 3].item() == 0.0 and lp[:, :2].abs().sum().item() == 0.0
    seq = sequence_logprob(lp, mask)
    assert seq[1].item() == pytest.approx(ref[1, 1, 5].item(), abs=1e-6)
    assert (ent[mask.bool()] > 0).all() and ent[mask == 0].abs().sum() == 0


def test_token_logprobs_on_a_k2_model_match_the_full_logits():
    """The response-only head path gives the full-logits log-probabilities and gradients."""
    from k2_core.model import K2ForCausalLM
    from rl_fixtures import tiny_configs

    torch.manual_seed(0)
    model = K2ForCausalLM(*tiny_configs(64))
    ids = torch.randint(1, 64, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:], mask[1, 6:8], mask[2, 2:5] = True, True, True
    lp, ent = token_logprobs(model, ids, mask)
    ref = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)
    ref_lp = torch.cat([torch.zeros(3, 1), ref.gather(-1, ids[:, 1:, None]).squeeze(-1)], 1) * mask
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    ref_ent = torch.cat([torch.zeros(3, 1), -(ref.exp() * ref).sum(-1)], 1) * mask
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(lp.sum(), model.lm_head.weight)
    (g_ref,) = torch.autograd.grad(ref_lp.sum(), model.lm_head.weight)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_budget_truncates_and_penalises():
    assert apply_budget(10, True, None).over_budget is False
    d = apply_budget(40, False, 32)
    assert (d.keep, d.over_budget) == (32, True)
    assert apply_budget(32, False, 32).over_budget  # ran into the budget without stopping
    assert not apply_budget(32, True, 32).over_budget
    assert budget_for("code", {"code": 64}, 16) == 64 and budget_for("math", {}, 16) == 16
    assert penalised(1.0, True, -0.5) == -0.5 and penalised(1.0, False, -0.5) == 1.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_temperature_decays_from_high_to_low(kind):
    ts = [temperature_at(s, 11, 1.2, 0.6, kind) for s in range(11)]
    assert ts[0] == pytest.approx(1.2) and ts[-1] == pytest.approx(0.6)
    assert all(a >= b - 1e-12 for a, b in zip(ts, ts[1:], strict=False))
    assert temperature_at(5, 11, 1.0, 0.5, "constant") == 1.0
    if kind == "linear":
        assert ts[5] == pytest.approx(0.9)
    if kind == "exponential":
        assert ts[5] == pytest.approx(1.2 * math.sqrt(0.5))
