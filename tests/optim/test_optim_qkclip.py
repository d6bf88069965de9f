"""QK-Clip: only heads over tau change, exact factors per row kind, recomputed logits <= tau."""

from __future__ import annotations

import pytest
import torch
from k2_optim import MuonClip, QKClipTarget, find_qk_clip_targets
from optim_helpers import TinyLM, k2_tiny, plain_targets


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(vocab, b=2, t=16):
    ids = torch.randint(0, vocab, (b, t))
    return ids, torch.roll(ids, -1, 1)


def _boost_logits(model, factor=8.0):
    """Scale the query up-projection so that logits spread well beyond tau."""
    with torch.no_grad():
        for attn in model.attention_layers():
            q = attn.q_b_proj if getattr(attn, "q_b_proj", None) is not None else attn.q_proj
            q.weight.mul_(factor * torch.linspace(0.2, 1.5, q.weight.shape[0]).unsqueeze(1))


def _reset(model):
    """Forget recorded max logits (k2 MLA keeps a running max until reset)."""
    if hasattr(model, "reset_max_logits"):
        model.reset_max_logits()
    else:
        model.set_record_max_logits(False)
        model.set_record_max_logits(True)


def _fwd_bwd(model, ids, labels):
    out = model(ids, labels=labels)
    out.loss.backward()
    return out


@pytest.mark.parametrize("q_lora", [True, False])
def test_k2_mla_only_heads_over_tau_with_exact_factors(q_lora):
    model = k2_tiny(2, [] if q_lora else ["model.q_lora_rank=null"])
    _boost_logits(model)
    model.set_record_max_logits(True)
    ids, labels = _batch(model.config.vocab_size)
    _fwd_bwd(model, ids, labels)
    s = model.max_logits().clone()  # [layers, heads]
    tau = float(s.median())  # about half the heads clip
    over = s > tau
    assert 0 < over.sum() < over.numel()
    attn = model.attention_layers()
    q_name = "q_b_proj" if q_lora else "q_proj"
    before = {
        i: {
            n: getattr(a, n).weight.detach().clone()
            for n in (q_name, "kv_b_proj", "kv_a_proj_with_mqa", "o_proj")
        }
        for i, a in enumerate(attn)
    }
    targets = find_qk_clip_targets(model)
    assert len(targets) == 2 and targets[0].q_weight is getattr(attn[0], q_name).weight
    # lr = 0, wd = 0: the update is a no-op, so every change comes from QK-Clip
    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau)
    opt.step()
    st = opt.last_clip_stats
    assert int(st["heads_clipped"]) == int(over.sum())
    torch.testing.assert_close(st["max_logit"], s.max())
    torch.testing.assert_close(st["per_layer_max"], s.amax(1))
    nope, rope, v = (
        model.config.qk_nope_head_dim,
        model.config.qk_rope_head_dim,
        model.config.v_head_dim,
    )
    heads = model.config.num_attention_heads
    for i, a in enumerate(attn):
        gamma = torch.where(over[i], tau / s[i], torch.ones_like(s[i]))
        q0 = before[i][q_name].view(heads, nope + rope, -1)
        q1 = getattr(a, q_name).weight.detach().view(heads, nope + rope, -1)
        torch.testing.assert_close(q1[:, :nope], q0[:, :nope] * gamma.sqrt()[:, None, None])
        torch.testing.assert_close(q1[:, nope:], q0[:, nope:] * gamma[:, None, None])
        k0 = before[i]["kv_b_proj"].view(heads, nope + v, -1)
        k1 = a.kv_b_proj.weight.detach().view(heads, nope + v, -1)
        torch.testing.assert_close(k1[:, :nope], k0[:, :nope] * gamma.sqrt()[:, None, None])
        assert torch.equal(k1[:, nope:], k0[:, nope:])  # values untouched
        assert torch.equal(
            a.kv_a_proj_with_mqa.weight, before[i]["kv_a_proj_with_mqa"]
        )  # shared k_R
        assert torch.equal(a.o_proj.weight, before[i]["o_proj"])
        assert torch.equal(q1[~over[i]], q0[~over[i]])  # unclipped heads exact
        assert torch.equal(k1[~over[i]], k0[~over[i]])
    # the same input now gives max logits <= tau on the clipped heads, unchanged elsewhere
    # (layer 0 sees the same input; deeper layers see inputs changed by the clip above them)
    _reset(model)
    with torch.no_grad():
        model(ids)
    s2, o0 = model.max_logits()[0], over[0]
    assert o0.any()
    assert (s2[o0] <= tau * (1 + 1e-4)).all()
    torch.testing.assert_close(s2[o0], torch.full_like(s2[o0], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2[~o0], s[0][~o0], rtol=1e-5, atol=1e-5)


def test_training_step_then_clip_and_no_double_clip_without_forward():
    model = k2_tiny(2)
    _boost_logits(model, 20.0)
    model.set_record_max_logits(True)
    ids, labels = _batch(model.config.vocab_size)
    _fwd_bwd(model, ids, labels)
    tau = 0.5 * float(model.max_logits()[0].max())
    opt = MuonClip(model, lr=1e-3, qk_clip_tau=tau)
    opt.step()
    assert int(opt.last_clip_stats["heads_clipped"]) > 0
    _reset(model)
    with torch.no_grad():
        model(ids)
    # tiny lr: the step barely moves the logits, so layer 0's clipped heads sit at ~tau
    assert float(model.max_logits()[0].max()) < tau * 1.05
    w = model.attention_layers()[0].q_b_proj.weight.detach().clone()
    opt.zero_grad(set_to_none=True)
    opt.step()  # no forward, no grads: nothing moves
    assert opt.last_clip_stats is None
    assert torch.equal(model.attention_layers()[0].q_b_proj.weight, w)


def test_max_logits_accumulate_over_micro_batches():
    model = k2_tiny(1)
    _boost_logits(model)
    model.set_record_max_logits(True)
    seen = []
    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=1e9)
    for _ in range(3):
        ids, labels = _batch(model.config.vocab_size)
        _reset(model)  # per-forward values; the optimizer must take their max itself
        _fwd_bwd(model, ids, labels)
        seen.append(model.max_logits()[0].clone())
    opt.step()
    torch.testing.assert_close(opt.last_clip_stats["per_layer_max"][0], torch.stack(seen).max())
    assert int(opt.last_clip_stats["heads_clipped"]) == 0


def test_max_logit_reduce_hook_is_applied():
    model = k2_tiny(1)
    model.set_record_max_logits(True)
    ids, labels = _batch(model.config.vocab_size)
    _fwd_bwd(model, ids, labels)
    s = model.max_logits()[0].clone()
    calls = []

    def reduce(t):  # stands in for an all-reduce MAX over ranks that saw larger logits
        calls.append(t.shape)
        return t * 4.0

    tau = float(s.max()) * 2.0  # nothing over tau locally
    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau, max_logit_reduce=reduce)
    opt.step()
    assert calls == [torch.Size([model.config.num_attention_heads])]
    assert int(opt.last_clip_stats["heads_clipped"]) == int((s * 4 > tau).sum()) > 0


def test_max_logit_reduce_is_joined_without_a_forward():
    """A process that ran no forward this step (e.g. an RL data rank with no response of its
    own) must still join the max-logit collective, or the ranks' collectives fall out of step;
    it contributes -inf, which never wins the max."""
    model = k2_tiny(1)
    model.set_record_max_logits(True)  # but no forward: nothing recorded
    seen = []

    def reduce(t):  # stands in for an all-reduce MAX where another rank saw large logits
        seen.append(t.clone())
        return torch.full_like(t, 1e6)

    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=10.0, max_logit_reduce=reduce)
    opt.step()
    heads = model.config.num_attention_heads
    assert len(seen) == 1 and seen[0].shape == (heads,) and bool(torch.isinf(seen[0]).all())
    assert int(opt.last_clip_stats["heads_clipped"]) == heads  # the reduced logits are applied


def test_qk_clip_off_changes_nothing():
    model = k2_tiny(1)
    _boost_logits(model)
    model.set_record_max_logits(True)
    ids, labels = _batch(model.config.vocab_size)
    _fwd_bwd(model, ids, labels)
    w = model.attention_layers()[0].q_b_proj.weight.detach().clone()
    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip=False, qk_clip_tau=1e-3)
    opt.step()
    assert torch.equal(model.attention_layers()[0].q_b_proj.weight, w)
    assert opt.last_clip_stats is None


def test_generic_multi_head_attention_example():
    model = TinyLM()
    with torch.no_grad():
        model.attn.q_proj.weight.mul_(torch.linspace(1, 30, 32).unsqueeze(1))
    ids = torch.randint(0, 64, (4, 12))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    s = model.attn.max_logits.clone()
    tau = float(s.median())
    over = s > tau
    q0, k0 = model.attn.q_proj.weight.detach().clone(), model.attn.k_proj.weight.detach().clone()
    qb0, v0 = model.attn.q_proj.bias.detach().clone(), model.attn.v_proj.weight.detach().clone()
    opt = MuonClip(
        model, lr=0.0, weight_decay=0.0, qk_clip_tau=tau, qk_clip_targets=plain_targets(model)
    )
    opt.step()
    gamma = torch.where(over, tau / s, torch.ones_like(s)).repeat_interleave(8)
    torch.testing.assert_close(model.attn.q_proj.weight, q0 * gamma.sqrt()[:, None])
    torch.testing.assert_close(model.attn.k_proj.weight, k0 * gamma.sqrt()[:, None])
    torch.testing.assert_close(model.attn.q_proj.bias, qb0 * gamma.sqrt())
    assert torch.equal(model.attn.v_proj.weight, v0)
    with torch.no_grad():
        s2 = model.attn.logits(model.embed_tokens(ids)).amax(dim=(0, 2, 3))
    assert (s2[over] <= tau * (1 + 1e-4)).all()
    torch.testing.assert_close(s2[~over], s[~over])


def test_callable_max_logits_and_validation():
    w = torch.nn.Parameter(torch.ones(8, 4))
    t = QKClipTarget(
        max_logits=lambda: torch.tensor([4.0, 1.0]),
        q_weight=w,
        k_weight=None,
        heads=2,
        q_sqrt_rows=[],
        q_gamma_rows=None,
    )
    assert t._pow["q"].tolist() == [0.0] * 4
    t = QKClipTarget(
        max_logits=lambda: torch.tensor([4.0, 1.0]),
        q_weight=w,
        k_weight=None,
        heads=2,
        q_sqrt_rows=[],
        q_gamma_rows=slice(None),
    )
    opt = MuonClip([w], lr=0.0, weight_decay=0.0, qk_clip_tau=2.0, qk_clip_targets=[t])
    w.grad = torch.zeros_like(w)
    opt.step()
    assert w[:4].eq(0.5).all() and w[4:].eq(1.0).all()  # gamma = 2/4 on head 0's rows
    with pytest.raises(ValueError, match="divisible"):
        QKClipTarget(max_logits=lambda: None, q_weight=torch.ones(7, 2), k_weight=None, heads=2)
    with pytest.raises(ValueError, match="both"):
        QKClipTarget(
            max_logits=lambda: None,
            q_weight=torch.ones(8, 2),
            k_weight=None,
            heads=2,
            q_gamma_rows=[0],
        )
