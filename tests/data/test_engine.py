"""The KV-cached generation engine against full forwards of the same model."""

from __future__ import annotations

import json

import pytest
import torch
from k2_core.config import ModelConfig, MoEConfig, RunConfig
from k2_core.errors import CheckpointError
from k2_core.model import build_model
from k2_core.modelio import save_model
from k2_data.inference import Engine, SamplingParams
from k2_data.tokenizer import BpeTokenizer

TEXTS = [
    f"the {w} of {n} is {n * 7} and the {w} is not {n + 3}."
    for w in ("cat", "dog", "sum", "king", "river", "stone")
    for n in range(40)
]


@pytest.fixture(scope="module")
def tokenizer():
    return BpeTokenizer.train(TEXTS, vocab_size=320, min_frequency=1)


def _model(vocab: int, seed: int = 0, dense: bool = False):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        first_k_dense_replace=1 if not dense else 2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    moe = MoEConfig(
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1
    )
    model = build_model((cfg, moe))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(_model(tokenizer.vocab_size), tokenizer, max_batch_size=8)


def _prompts(tokenizer, n=5):
    return [tokenizer.encode(TEXTS[i * 13])[: 3 + 2 * i] for i in range(n)]


@torch.no_grad()
def test_greedy_equals_full_forward_argmax_and_logprobs(engine, tokenizer):
    prompts = _prompts(tokenizer)
    outs = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])
    )
    for p, c in zip(prompts, outs, strict=True):
        assert c.prompt_ids == p and len(c.token_ids) == len(c.logprobs) >= 1
        seq = torch.tensor(p + c.token_ids)[None]
        logits = engine.model(seq).logits[0, len(p) - 1 : -1]
        assert c.token_ids == logits.argmax(-1).tolist()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=1e-4)
        if c.finish_reason == "length":
            assert len(c.token_ids) == 12


@torch.no_grad()
def test_sampled_logprobs_match_full_forward(engine, tokenizer):
    prompts = _prompts(tokenizer, 3)
    outs = engine.generate(
        prompts, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=3)
    )
    for p, c in zip(prompts, outs, strict=True):
        seq = torch.tensor(p + c.token_ids)[None]
        logits = engine.model(seq).logits[0, len(p) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=1e-4)


def test_seed_determinism_and_batch_composition_independence(engine, tokenizer):
    prompts = _prompts(tokenizer, 6)
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=16, seed=100 + i, stop_token_ids=[])
        for i in range(6)
    ]
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # alone, reversed, in batches of 2, next to unseeded strangers: the same tokens
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in alone] == [c.token_ids for c in a]
    rev = engine.generate(prompts[::-1], params[::-1])[::-1]
    assert [c.token_ids for c in rev] == [c.token_ids for c in a]
    small = Engine(engine.model, tokenizer, max_batch_size=2)
    mixed = small.generate(prompts + prompts[:3], params + [SamplingParams(max_new_tokens=30)] * 3)
    assert [c.token_ids for c in mixed[:6]] == [c.token_ids for c in a]
    # a different seed gives a different sample (16 tokens from ~320)
    other = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, seed=999))[0]
    assert other.token_ids != a[0].token_ids


def test_stop_strings_and_stop_ids(engine, tokenizer):
    prompt = _prompts(tokenizer, 1)[0]
    base = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[])
    )[0]
    assert base.text == tokenizer.decode(base.token_ids)
    # stop id: the 6th generated token (its first occurrence) ends the sequence
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[tok])
    )[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(base.token_ids[:first])
    # stop string: a piece of the text in the middle
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    out = engine.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_new_tokens=24, stop=["@@never@@", stop], stop_token_ids=[]
        ),
    )[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(base.token_ids)
    # budget
    out = engine.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=4, stop_token_ids=[])
    )[0]
    assert out.finish_reason == "length" and out.token_ids == base.token_ids[:4]


def test_default_stop_is_im_end(tokenizer):
    model = _model(tokenizer.vocab_size, seed=1)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    head = torch.nn.Linear(64, tokenizer.vocab_size)  # a head biased hard toward <|im_end|>
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[im_end] = 1e4
    model.lm_head = head
    eng = Engine(model, tokenizer)
    out = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=10))[0]
    assert out.token_ids == [im_end] and out.finish_reason == "stop" and out.text == ""


def test_load_weights_changes_outputs_and_version(tokenizer):
    a, b = _model(tokenizer.vocab_size, seed=1), _model(tokenizer.vocab_size, seed=2)
    eng = Engine(a, tokenizer)
    prompt = [[10, 11, 12, 13]]
    sp = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[])
    before = eng.generate(prompt, sp)[0].token_ids
    want = Engine(b, tokenizer).generate(prompt, sp)[0].token_ids
    eng.load_weights(b.state_dict(), version=7)
    assert eng.version == 7 and eng.generate(prompt, sp)[0].token_ids == want != before
    with pytest.raises(KeyError):
        eng.load_weights({"nope": torch.zeros(1)}, version=8)


def test_bad_requests_rejected(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="exceed"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=1000))
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[1, 10**6]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_shared_training_model_keeps_its_mode(tokenizer):
    model = _model(tokenizer.vocab_size).train()
    Engine(model, tokenizer).generate([[3, 4]], SamplingParams(max_new_tokens=2, seed=0))
    assert model.training


def test_from_checkpoint_finds_dataset_tokenizer(tmp_path, tokenizer):
    model = _model(tokenizer.vocab_size)
    data = tmp_path / "data"
    tokenizer.save(str(data / "tokenizer"))
    (data / "manifest.json").write_text(
        json.dumps(
            {
                "format": "k2-packed",
                "complete": True,
                "seq_len": 64,
                "eos_id": tokenizer.eos_id,
                "vocab_size": tokenizer.vocab_size,
                "tokenizer": {"path": "tokenizer"},
            }
        )
    )
    run = RunConfig.model_validate(
        {
            "model": model.config.model_dump(),
            "moe": model.moe_config.model_dump(),
            "data": {"options": {"uri": str(data)}},
        }
    )
    save_model(model, str(tmp_path / "ckpt"), run_config=run)
    eng = Engine.from_checkpoint(str(tmp_path / "ckpt"))
    assert eng.tokenizer.content_hash == tokenizer.content_hash
    save_model(model, str(tmp_path / "bare"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        Engine.from_checkpoint(str(tmp_path / "bare"))


def test_k2_generator_chat_and_complete(tmp_path, tokenizer):
    import asyncio

    from k2_core.plugins import get_registry
    from k2_data.generators.base import ChatResult, CompleteResult, Generator

    model = _model(tokenizer.vocab_size)
    save_model(model, str(tmp_path / "ckpt"))
    tokenizer.save(str(tmp_path / "ckpt" / "tokenizer"))
    gen = get_registry().build(
        "generator",
        "k2",
        options={"checkpoint": str(tmp_path / "ckpt"), "max_tokens": 6, "temperature": 0.9},
    )
    assert isinstance(gen, Generator)
    msgs = [{"role": "user", "content": "the cat of 3"}]

    async def go():
        many = await asyncio.gather(*(gen.chat(msgs, seed=s) for s in (1, 2, 1, 3)))
        text = await gen.complete("the dog of", max_tokens=5, temperature=0)
        await gen.aclose()
        return many, text

    many, text = asyncio.run(go())
    assert all(isinstance(r, ChatResult) for r in many) and isinstance(text, CompleteResult)
    assert many[0].message == many[2].message  # same seed, same answer
    assert many[0].message["role"] == "assistant"
    prompt_len = len(
        tokenizer.encode(
            "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
            "<|im_end|><|im_user|>user<|im_middle|>the cat of 3<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>",
            allow_special=True,
        )
    )
    assert many[0].usage["prompt_tokens"] == prompt_len
    assert 1 <= many[0].usage["completion_tokens"] <= 6
    assert many[0].finish_reason in ("stop", "length")
    assert gen.engine.tokenizer.content_hash == tokenizer.content_hash
    assert gen._batcher.requests == 5 and gen._batcher.batches < 5  # concurrent calls batched
    ref = Engine(model, tokenizer).generate(
        [tokenizer.encode("the dog of")], SamplingParams(temperature=0, max_new_tokens=5)
    )[0]
    assert text.text == ref.text and text.usage["completion_tokens"] == len(ref.token_ids)
