"""MLA's compressed KV cache: cached decode reproduces the full forward's logits."""

from __future__ import annotations

import pytest
import torch
from k2_core.config import ModelConfig, MoEConfig
from k2_core.model import build_model
from k2_core.model.kvcache import KVCache

VOCAB = 200


def _model(q_lora: int | None, interleave: bool, dense: bool = True):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        first_k_dense_replace=3 if dense else 1,
        num_attention_heads=4,
        q_lora_rank=q_lora,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rope_interleave=interleave,
    )
    moe = MoEConfig(
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1
    )
    model = build_model((cfg, moe))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


CASES = [
    pytest.param(32, True, id="q_lora-interleaved"),
    pytest.param(None, True, id="direct_q-interleaved"),
    pytest.param(32, False, id="q_lora-halves"),
]


@pytest.mark.parametrize(("q_lora", "interleave"), CASES)
@torch.no_grad()
def test_cached_decode_matches_full_forward(q_lora, interleave):
    model = _model(q_lora, interleave)
    ids = torch.randint(0, VOCAB, (3, 20))
    full = model(ids).logits
    cache = model.new_cache(3, 24)
    out = [model(ids[:, :7], cache=cache).logits]
    out += [model(ids[:, t : t + 1], cache=cache).logits for t in range(7, 16)]
    out.append(model(ids[:, 16:], cache=cache).logits)  # several new tokens at once
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [20, 20, 20]
    # only the compressed latent and the shared rotary key are cached
    assert isinstance(cache, KVCache) and cache.layers[0].shape == (3, 24, 24 + 8)


@torch.no_grad()
def test_ragged_prefill_and_row_selection():
    """Right-padded prompts of different lengths, then rows dropped mid-decode."""
    model = _model(32, True, dense=False)
    lens = [5, 9, 3]
    prompts = [torch.randint(0, VOCAB, (n,)) for n in lens]
    cont = torch.randint(0, VOCAB, (3, 6))
    batch = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    cache = model.new_cache(3, 16)
    model(batch, cache=cache, new_lengths=torch.tensor(lens))
    steps = []
    rows = torch.arange(3)
    for t in range(6):
        if t == 3:  # row 1 finished: drop it from the batch and the cache
            rows = torch.tensor([0, 2])
            cache.select(rows)
        steps.append(model(cont[rows, t : t + 1], cache=cache).logits[:, 0])
    for i, p in enumerate(prompts):
        seq = torch.cat((p, cont[i]))
        ref = model(seq[None]).logits[0, len(p) :]
        got = [s[i] for s in steps[:3]]
        if i != 1:
            got += [s[[0, 2].index(i)] for s in steps[3:]]
        torch.testing.assert_close(torch.stack(got), ref[: len(got)], atol=1e-5, rtol=1e-5)


def test_capacity_and_padding_misuse_rejected():
    model = _model(32, True)
    ids = torch.randint(0, VOCAB, (2, 10))
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="capacity"):
        model(ids, cache=cache)
    cache = model.new_cache(2, 32)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="empty cache"):
        model(ids, cache=cache, new_lengths=torch.tensor([3, 4]))


@torch.no_grad()
def test_uniform_rows_take_the_slice_path():
    # equal-length rows (no right padding) write slices, decode one token without a mask and
    # read cos/sin from a per-cache table; the per-row (ragged) path gives the same logits
    model = _model(32, True, dense=False)
    ids = torch.randint(0, VOCAB, (2, 12))
    fast, ragged = model.new_cache(2, 16), model.new_cache(2, 16)
    a = [model(ids[:, :6], cache=fast).logits]
    b = [model(ids[:, :6], cache=ragged, new_lengths=torch.tensor([6, 6])).logits]
    assert fast.uniform and not ragged.uniform
    positions = fast.begin(1)
    assert fast.visible is None and positions.tolist() == [[6]]
    fast.write_index = None  # undo the probe (commit would)
    for t in range(6, 12):
        a.append(model(ids[:, t : t + 1], cache=fast).logits)
        b.append(model(ids[:, t : t + 1], cache=ragged).logits)
    torch.testing.assert_close(torch.cat(a, 1), torch.cat(b, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(a, 1), model(ids).logits, atol=1e-5, rtol=1e-5)
    for la, lb in zip(fast.layers, ragged.layers, strict=True):
        torch.testing.assert_close(la[:, :12], lb[:, :12], atol=1e-6, rtol=1e-6)
