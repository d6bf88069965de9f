"""Activation policies: same loss and (nearly) the same grads, fewer saved bytes per layer,
FP8 tile round trips, and the planner's per-layer prediction against the measured bytes."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from k2_core.configio import load_config
from k2_core.errors import ConfigError
from k2_core.model import MLA, build_model
from k2_core.plugins import get_registry
from k2_hw_h800.activations import (
    POLICY_LEVELS,
    ActivationPolicy,
    apply_activation_policy,
    fp8_dequantize,
    fp8_quantize,
    measure_saved_bytes,
)
from k2_hw_h800.memory import layer_activation_bytes

# FP8 changes only what the backward reads: the loss is bit-equal, grads move by the E4M3
# rounding of the stored inputs (3 mantissa bits), a few percent at most
GRAD_TOL = {"none": 0.0, "recompute": 1e-5, "recompute+fp8": 0.1, "recompute+fp8+offload": 0.1}


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", ["model.num_hidden_layers=2"], check={"model", "moe"})


@pytest.fixture(scope="module")
def base(cfg):
    torch.manual_seed(0)
    return build_model(cfg, get_registry())


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8192, (2, 48), generator=g)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture(scope="module")
def reference(base, ids):
    return _step(base, ids)


@pytest.mark.parametrize("name", list(POLICY_LEVELS))
def test_policy_keeps_loss_and_grads(base, ids, reference, name):
    model = copy.deepcopy(base)
    apply_activation_policy(model, POLICY_LEVELS[name])
    loss, grads = _step(model, ids)
    ref_loss, ref_grads = reference
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        err = ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
        assert err <= GRAD_TOL[name] + 1e-7, (n, err)


def test_recompute_under_bf16_autocast(base, ids):
    """Recipes replay the forward's autocast: rebuilt tensors keep the saved dtype."""

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    model = copy.deepcopy(base)
    apply_activation_policy(model, POLICY_LEVELS["recompute"])
    (loss, grads), (ref_loss, ref_grads) = step(model), step(copy.deepcopy(base))
    assert torch.equal(loss, ref_loss)
    for n, g in grads.items():
        # bf16 gradients summed in another order: within bf16 rounding
        err = ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
        assert err < 5e-3, (n, err)


def test_offload_alone_is_exact(base, ids, reference):
    model = copy.deepcopy(base)
    apply_activation_policy(model, ActivationPolicy(cpu_offload=True))
    loss, grads = _step(model, ids)
    assert torch.equal(loss, reference[0])
    for n, g in grads.items():
        assert torch.equal(g, reference[1][n]), n


def test_layer_sessions_chain_and_die_with_the_graph(base, ids):
    model = copy.deepcopy(base)
    handle = apply_activation_policy(model, POLICY_LEVELS["recompute+fp8+offload"])
    out = model(ids, labels=ids, return_logits=False)
    last = handle.last()
    assert last is not None and last.layer == 1 and last.prev() is not None
    assert last.prev().layer == 0 and last.offloaded and not last.cache  # forward-only state gone
    out.loss.backward()
    del out, last
    gc.collect()
    assert handle.last() is None  # nothing keeps a step's sessions (and their tensors) alive


def test_each_policy_cuts_saved_bytes_per_layer(base, ids):
    model = copy.deepcopy(base)
    seen = []
    for pol in POLICY_LEVELS.values():
        apply_activation_policy(model, pol)
        seen.append(measure_saved_bytes(model, lambda: model(ids, labels=ids, return_logits=False)))
    for layer in (0, 1):  # dense, then MoE
        device = [s[layer].device for s in seen]
        assert device == sorted(device, reverse=True) and len(set(device)) == 4, device
        assert device[1] < 0.6 * device[0] and device[3] < 0.25 * device[0]
        assert seen[3][layer].host > 0 and seen[0][layer].host == 0


def test_planner_predicts_measured_bytes(cfg):
    """bf16, every policy, both layer kinds: the memory model agrees within 2%."""
    torch.manual_seed(0)
    model = build_model(cfg, get_registry(), dtype=torch.bfloat16)
    ids = torch.randint(0, 8192, (2, 64))
    for pol in POLICY_LEVELS.values():
        apply_activation_policy(model, pol)
        got = measure_saved_bytes(model, lambda: model(ids))
        for layer, meas in got.items():
            pred = layer_activation_bytes(cfg.model, cfg.moe, layer, ids.numel(), pol)
            assert pred.device == pytest.approx(meas.device, rel=0.02), (pol, layer)
            assert pred.host == pytest.approx(meas.host, rel=0.02, abs=4096), (pol, layer)


def test_policy_leaves_state_dict_and_max_logits(base, ids):
    model = copy.deepcopy(base)
    keys = list(model.state_dict())
    handle = apply_activation_policy(model, POLICY_LEVELS["recompute+fp8+offload"])
    assert list(model.state_dict()) == keys
    model.set_record_max_logits(True)
    model(ids, labels=ids, return_logits=False).loss.backward()
    with_policy = model.max_logits().clone()
    handle.remove()
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    model.reset_max_logits()
    model(ids, labels=ids, return_logits=False)
    assert torch.equal(with_policy, model.max_logits())


def test_eval_forward_is_untouched(base, ids):
    model = copy.deepcopy(base)
    apply_activation_policy(model, POLICY_LEVELS["recompute+fp8+offload"])
    with torch.no_grad():
        a = model(ids).logits
        b = base(ids).logits
    assert torch.equal(a, b)


def test_kv_cache_decoding_passes_through(base, ids):
    model = copy.deepcopy(base)
    apply_activation_policy(model, POLICY_LEVELS["recompute+fp8+offload"])
    outs = []
    for m in (model, base):
        cache = m.new_cache(2, 32)
        first = m(ids[:, :8], cache=cache).logits  # grad enabled: the policy's sessions run
        nxt = m(ids[:, 8:9], cache=cache).logits
        outs.append((first.detach(), nxt.detach()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_tiles_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 300, generator=g) * torch.logspace(-3, 3, 300)).to(dtype)
    q = fp8_quantize(x)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == (37, 3, 128)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (37, 3, 1)
    y = fp8_dequantize(q)
    assert y.shape == x.shape and y.dtype == dtype
    xf, yf = x.float(), y.float()
    scale = q.scale.expand(-1, -1, 128).reshape(37, 384)[:, :300]
    # E4M3: relative rounding <= 2^-4 for normal values; subnormals: absolute 2^-10 x scale;
    # plus the dtype's own rounding on the way back
    back = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bound = (2.0**-4 + back) * xf.abs() + 2.0**-10 * scale
    assert ((xf - yf).abs() <= bound * 1.001).all()
    assert ((xf - yf).norm() / xf.norm()).item() < 0.05
    assert q.nbytes() == 37 * 3 * (128 + 4)


def test_fp8_zero_tile_and_policy_validation(base):
    z = torch.zeros(2, 128)
    assert torch.equal(fp8_dequantize(fp8_quantize(z)), z)
    with pytest.raises(ConfigError, match="offload"):
        apply_activation_policy(copy.deepcopy(base), {"offload": True})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_uses_pinned_memory_and_matches(cfg):
    torch.manual_seed(0)
    base = build_model(cfg, get_registry(), device="cuda")
    ids = torch.randint(0, 8192, (2, 128), device="cuda")
    ref_loss, ref_grads = _step(base, ids)
    model = copy.deepcopy(base)
    apply_activation_policy(model, ActivationPolicy(cpu_offload=True))
    loss, grads = _step(model, ids)
    assert torch.equal(loss, ref_loss)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-5, atol=1e-7), n
    got = measure_saved_bytes(model, lambda: model(ids, labels=ids, return_logits=False))
    assert all(v.host > 0 for v in got.values())


class _ChangedMLA(MLA):
    """An MLA whose forward and steps differ from the stock one (a stand-in for a future edit)."""

    def expand(self, cq, ckv, k_rot, cos, sin):
        q, k, v = super().expand(cq, ckv, k_rot, cos, sin)
        return q * 1.5, k, v

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        return 0.5 * super().forward(x, cos, sin, attn_mask, cache)


def test_policy_follows_a_changed_mla(base, ids):
    """The policy wraps MLA's `expand` seam instead of copying its forward: a model whose MLA
    computes something else still gets the same loss and grads under recompute."""
    changed = copy.deepcopy(base)
    for layer in changed.model.layers:
        layer.self_attn.__class__ = _ChangedMLA
    ref_loss, ref_grads = _step(changed, ids)
    assert not torch.equal(ref_loss, _step(base, ids)[0])  # the change does change the model
    for name in ("recompute", "recompute+fp8+offload"):
        model = copy.deepcopy(changed)
        apply_activation_policy(model, POLICY_LEVELS[name])
        loss, grads = _step(model, ids)
        assert torch.equal(loss, ref_loss), name
        for n, g in grads.items():
            err = ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
            assert err <= GRAD_TOL[name] + 1e-7, (name, n, err)


def test_recompute_uses_the_experts_announcement(base, ids, monkeypatch):
    """An experts kernel that stops naming what it saves is an error under recompute/FP8, not a
    silent fallback to keeping everything; offload alone needs no names and still runs."""
    import k2_moe.experts

    monkeypatch.setattr(k2_moe.experts, "announce_saved", lambda saved: None)
    model = copy.deepcopy(base)
    apply_activation_policy(model, POLICY_LEVELS["recompute"])
    with pytest.raises(RuntimeError, match="announce"):
        model(ids, labels=ids, return_logits=False)
    apply_activation_policy(model, ActivationPolicy(cpu_offload=True))
    model(ids, labels=ids, return_logits=False).loss.backward()
