"""Tokenizers: bpe training and round trips, special tokens, save/load, tiktoken files."""

from __future__ import annotations

import base64

import pytest
from k2_core.errors import ConfigError
from k2_data.tokenizer import (
    K2_SPECIAL_IDS,
    SPECIAL_TOKENS,
    BpeOptions,
    BpeTokenizer,
    TiktokenOptions,
    TiktokenTokenizer,
    build_bpe,
    build_tiktoken,
    load_tokenizer,
)
from k2data_testutil import make_texts

TEXT = "Hello, wörld! 你好 1234 <|im_end|> tabs\tand\nnewlines  "


@pytest.fixture(scope="module")
def bpe():
    return BpeTokenizer.train(make_texts(300, 7) + [TEXT] * 3, vocab_size=600)


def test_bpe_round_trip_and_specials(bpe):
    assert set(SPECIAL_TOKENS) <= set(bpe.special_tokens)
    assert bpe.vocab_size <= 600
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    # special-token strings inside documents stay text unless allowed
    assert bpe.special_tokens["<|im_end|>"] not in ids
    chat = "<|im_user|>user<|im_middle|>hi<|im_end|><|tool_call_begin|>f<|tool_call_end|>"
    cids = bpe.encode(chat, allow_special=True)
    for t in ("<|im_user|>", "<|im_middle|>", "<|im_end|>", "<|tool_call_begin|>"):
        assert bpe.special_tokens[t] in cids
    assert bpe.decode(cids) == chat
    batch = bpe.encode_batch([TEXT, "abc", ""])
    assert bpe.decode_batch(batch) == [TEXT, "abc", ""]
    assert len({bpe.eos_id, bpe.bos_id, bpe.pad_id}) == 3


def test_bpe_save_load_hash(bpe, tmp_path):
    uri = str(tmp_path / "tok")
    bpe.save(uri)
    again = load_tokenizer(uri)
    assert again.content_hash == bpe.content_hash and len(bpe.content_hash) == 64
    assert again.encode(TEXT) == bpe.encode(TEXT)
    mem = load_tokenizer(bpe.save("memory://k2-tests/tok"))
    assert mem.content_hash == bpe.content_hash
    # a path option loads instead of training
    assert build_bpe(options=BpeOptions(path=uri)).content_hash == bpe.content_hash
    assert (
        build_bpe(options=BpeOptions(path=f"{uri}/tokenizer.json")).content_hash == bpe.content_hash
    )
    with pytest.raises(ConfigError):
        build_bpe(options=BpeOptions())


def test_bpe_training_is_deterministic():
    texts = make_texts(200, 3)
    assert (
        BpeTokenizer.train(texts, 500).content_hash == BpeTokenizer.train(texts, 500).content_hash
    )


def _tiktoken_file(path, n_extra: int = 200) -> int:
    """256 single bytes plus `n_extra` multi-byte tokens; returns the number of ranks."""
    toks = [bytes([i]) for i in range(256)]
    seen = set(toks)
    for a in b"etaoinsrhl ":
        for b in b"etaoinsrhl ":
            if len(toks) < 256 + n_extra and bytes([a, b]) not in seen:
                toks.append(bytes([a, b]))
                seen.add(bytes([a, b]))
    with open(path, "wb") as f:
        for rank, t in enumerate(toks):
            f.write(base64.b64encode(t) + b" " + str(rank).encode() + b"\n")
    return len(toks)


def test_tiktoken_small_file(tmp_path):
    p = tmp_path / "small.tiktoken"
    n = _tiktoken_file(p)
    tok = build_tiktoken(options=TiktokenOptions(path=str(p)))
    assert tok.vocab_size == n + len(SPECIAL_TOKENS)
    assert tok.eos_id == n + SPECIAL_TOKENS.index("[EOS]")
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and max(ids) < n
    chat = "<|im_system|>system<|im_middle|>be brief<|im_end|>"
    cids = tok.encode(chat, allow_special=True)
    assert tok.special_tokens["<|im_system|>"] in cids and tok.decode(cids) == chat
    saved = tok.save(str(tmp_path / "tk"))
    again = load_tokenizer(saved)
    assert again.content_hash == tok.content_hash and again.encode_batch([TEXT]) == [ids]
    custom = TiktokenTokenizer(p.read_bytes(), {"[BOS]": 900, "[EOS]": 901, "[PAD]": 902})
    assert custom.eos_id == 901 and custom.vocab_size == 903


def test_tiktoken_k2_sized_file_gets_k2_ids(tmp_path):
    """A 163,584-rank file (K2's size) gets K2's published special-token ids."""
    p = tmp_path / "k2.tiktoken"
    toks = [bytes([i]) for i in range(256)]
    i = 0
    while len(toks) < 163584:  # unique 4-byte tokens (0xff + three bytes), never merged into
        toks.append(b"\xff" + i.to_bytes(3, "big"))
        i += 1
    with open(p, "wb") as f:
        f.write(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(toks)))
    tok = build_tiktoken(options=TiktokenOptions(path=str(p)))
    assert tok.vocab_size == 163840
    for name, i in K2_SPECIAL_IDS.items():
        assert tok.special_tokens[name] == i
    assert tok.eos_id == 163585 and tok.bos_id == 163584
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_tiktoken_bad_file(tmp_path):
    p = tmp_path / "bad.tiktoken"
    p.write_bytes(b"not base64 at all\n")
    with pytest.raises(ConfigError):
        build_tiktoken(options=TiktokenOptions(path=str(p)))
    with pytest.raises(ConfigError, match="no such file"):
        build_tiktoken(options=TiktokenOptions(path=str(tmp_path / "missing")))


def test_plugin_registers_tokenizers_and_command():
    from k2_core.registry import Registry
    from k2_data import plugin

    reg = Registry()
    plugin.k2_register(reg)
    assert reg.names("tokenizer") == ["bpe", "tiktoken"]
    assert "data" in reg.names("command")
    with pytest.raises(ConfigError, match="vocab_sise"):
        reg.options("tokenizer", "bpe", {"vocab_sise": 10})
