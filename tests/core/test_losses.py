"""The fused LM-head + cross-entropy equals the plain head + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from k2_core.configio import load_config
from k2_core.model import build_model
from k2_core.model.losses import linear_cross_entropy


@pytest.mark.parametrize("skip_ignored", [False, True])
@pytest.mark.parametrize("chunk", [7, 128, 4096])
def test_values_and_gradients_match(chunk, skip_ignored):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 100, (300,), generator=g)
    labels[::5] = -100
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    (ref * 2).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, labels, chunk=chunk, skip_ignored=skip_ignored)
    (out * 2).backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(h.grad, gh, atol=1e-6) and torch.allclose(w.grad, gw, atol=1e-6)


@pytest.mark.parametrize("skip_ignored", [False, True])
def test_all_ignored_is_zero_not_nan(skip_ignored):
    h = torch.randn(4, 8, requires_grad=True)
    out = linear_cross_entropy(
        h, torch.randn(10, 8), torch.full((4,), -100), skip_ignored=skip_ignored
    )
    out.backward()
    assert out.item() == 0.0 and torch.all(h.grad == 0)


def test_model_fused_loss_equals_plain():
    cfg = load_config("tiny", ["model.num_hidden_layers=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    labels = ids.roll(-1, dims=1)
    plain = model(ids, labels=labels)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    assert torch.allclose(fused.loss, plain.loss, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_under_bf16_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(50, 32, generator=g)
    labels = torch.randint(0, 50, (64,), generator=g)
    ref = F.cross_entropy(h @ w.t(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, labels)
    assert abs(out.item() - ref.item()) < 0.05 * ref.item()
