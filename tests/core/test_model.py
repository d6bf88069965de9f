"""The K2 decoder: shapes, loss, causality, packed segments, max-logit recording, meta build."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from k2_core.config import ModelConfig, MoEConfig, RopeScaling
from k2_core.configio import load_config
from k2_core.model import CausalLMOutput, K2ForCausalLM, build_model
from k2_core.model.rope import softmax_scale

VOCAB = 300


def _has_moe() -> bool:
    try:
        from k2_core.plugins import get_registry

        return "moe" in get_registry().names("ffn")
    except Exception:  # noqa: BLE001
        return False


HAS_MOE = _has_moe()
needs_moe = pytest.mark.skipif(not HAS_MOE, reason="no `moe` ffn registered (k2-moe not installed)")


def _cfg(dense: bool = True, **kw) -> tuple[ModelConfig, MoEConfig]:
    m = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        first_k_dense_replace=3 if dense else 1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    m.update({k: v for k, v in kw.items() if k in ModelConfig.model_fields})
    e = dict(
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1
    )
    e.update({k: v for k, v in kw.items() if k in MoEConfig.model_fields})
    return ModelConfig(**m), MoEConfig(**e)


def _model(dense: bool = True, seed: int = 0, std: float = 0.1, **kw) -> K2ForCausalLM:
    torch.manual_seed(seed)
    model = build_model(_cfg(dense, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, std)
    return model.eval()


CONFIGS = [pytest.param(True, id="dense"), pytest.param(False, id="moe", marks=needs_moe)]


@pytest.mark.parametrize("dense", CONFIGS)
def test_shapes_and_loss(dense):
    model = _model(dense)
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (2, 12, VOCAB)
    keep = labels != -100
    ce = F.cross_entropy(out.logits[keep], labels[keep])
    aux = out.aux_loss if out.aux_loss is not None else 0.0
    torch.testing.assert_close(out.loss, ce + aux)
    assert model(ids).loss is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@needs_moe
def test_moe_helpers_and_aux_loss():
    model = _model(False, seq_aux_loss_coef=0.01).train()
    assert len(model.moe_layers()) == 2
    out = model(torch.randint(0, VOCAB, (2, 10)), labels=torch.randint(0, VOCAB, (2, 10)))
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    stats = model.load_stats()
    assert sorted(stats) == [1, 2]
    assert int(stats[1]["counts"].sum()) == 2 * 10 * 2
    model.update_router_bias()
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


@needs_moe
def test_fused_loss_includes_the_balance_loss():
    """Bug: the fused head+loss path (the trainer's) dropped the sequence balance loss."""
    model = _model(False, seq_aux_loss_coef=0.01).train()
    ids, labels = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    full = model(ids, labels=labels)
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None and float(fused.aux_loss) > 0
    torch.testing.assert_close(fused.loss, full.loss)


def test_causal():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 16))
    ids2 = ids.clone()
    ids2[0, 9] = (ids[0, 9] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("dense", CONFIGS)
def test_segment_ids_isolate_packed_sequences(dense, record):
    model = _model(dense)
    model.set_record_max_logits(record)
    a = torch.randint(0, VOCAB, (1, 7))
    b = torch.randint(0, VOCAB, (1, 9))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, position_ids=pos, segment_ids=seg).logits
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(out[:, :7], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], lb, atol=1e-5, rtol=1e-5)


def _naive_max_logits(attn, x, cos, sin, segment_ids=None) -> torch.Tensor:
    """Per-head max of q_i . k_j * scale over visible (j <= i, same segment) pairs, by loops."""
    bsz, seq, _ = x.shape
    nh, dn, dr = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(bsz, seq, nh, dn + dr)
    ckv = attn.kv_a_proj_with_mqa(x)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(ckv[..., : attn.kv_lora_rank])).view(bsz, seq, nh, -1)
    k_rot = ckv[..., attn.kv_lora_rank :]

    def rot(v, c, s):  # interleaved pairs (x0, x1), (x2, x3), ...
        out = v.clone()
        out[..., 0::2] = v[..., 0::2] * c - v[..., 1::2] * s
        out[..., 1::2] = v[..., 1::2] * c + v[..., 0::2] * s
        return out

    best = torch.full((nh,), -math.inf)
    for b in range(bsz):
        for i in range(seq):
            for j in range(i + 1):
                if segment_ids is not None and segment_ids[b, i] != segment_ids[b, j]:
                    continue
                for h in range(nh):
                    qi = torch.cat([q[b, i, h, :dn], rot(q[b, i, h, dn:], cos[0, i], sin[0, i])])
                    kj = torch.cat([kv[b, j, h, :dn], rot(k_rot[b, j], cos[0, j], sin[0, j])])
                    best[h] = max(best[h], float(qi @ kj) * attn.softmax_scale)
    return best


@pytest.mark.parametrize("segments", [False, True])
def test_max_logit_recording_matches_naive(segments):
    model = _model(num_hidden_layers=2, first_k_dense_replace=2, std=0.3)
    ids = torch.randint(0, VOCAB, (2, 8))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]]) if segments else None
    inputs = {}
    model.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0]))
    model.set_record_max_logits(True)
    with torch.no_grad():
        model(ids, segment_ids=seg)
        got = model.max_logits()
        cos, sin = model.model.rotary_emb(torch.arange(8).unsqueeze(0), torch.float32)
        naive = _naive_max_logits(model.model.layers[1].self_attn, inputs["x"], cos, sin, seg)
    assert got.shape == (2, 4) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got[1], naive, atol=1e-4, rtol=1e-5)
    assert got.abs().max() > 0.5  # a meaningful check, not all near zero
    model.set_record_max_logits(False)
    with pytest.raises(RuntimeError):
        model.max_logits()


@pytest.mark.parametrize("dense", CONFIGS)
@pytest.mark.parametrize("segments", [False, True])
def test_sdpa_equals_recording_path(dense, segments):
    model = _model(dense, std=0.1)
    ids = torch.randint(0, VOCAB, (2, 16))
    seg = torch.tensor([[0] * 5 + [1] * 11, [3] * 16]) if segments else None
    with torch.no_grad():
        fused = model(ids, segment_ids=seg).logits
        model.set_record_max_logits(True)
        recorded = model(ids, segment_ids=seg).logits
    assert (fused - recorded).abs().max().item() < 1e-5


def test_yarn_softmax_scale_and_no_interleave():
    m, _ = _cfg(
        rope_scaling=RopeScaling(
            factor=4.0, original_max_position_embeddings=64, mscale_all_dim=0.707
        )
    )
    assert math.isclose(softmax_scale(m), 24**-0.5 * (0.1 * 0.707 * math.log(4.0) + 1) ** 2)
    model = _model(rope_interleave=False, rope_scaling=m.rope_scaling)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_init_and_tied_embeddings():
    model = build_model(_cfg(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    std = model.model.layers[0].self_attn.kv_b_proj.weight.std().item()
    assert 0.015 < std < 0.025


def test_bf16_build_and_forward():
    model = build_model(_cfg(), dtype=torch.bfloat16)
    out = model(torch.randint(0, VOCAB, (1, 8)), labels=torch.randint(0, VOCAB, (1, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


@needs_moe
def test_meta_build_k2_1t_exact_param_count():
    cfg = load_config("k2-1t")
    model = build_model(cfg, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert model.num_parameters() == 1_026_408_209_408
    assert len(model.moe_layers()) == 60


def test_meta_build_dense_only():
    model = build_model(_cfg(), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
