"""The tokenizer half of `k2 export-hf`: Hugging Face tokenizer files and K2's chat template.

`export_tokenizer` writes, into an exported model folder:
    tokenizer.json            HF `tokenizers` serialization (a bpe tokenizer's own file; a
                              tiktoken file converted to byte-level BPE with the same ids)
    tokenizer_config.json     PreTrainedTokenizerFast, special tokens, `chat_template`
    special_tokens_map.json   bos/eos/pad (and unk when the tokenizer has one)
    generation_config.json    bos id; eos ids <|im_end|> (end of a chat turn) and [EOS]
so `AutoTokenizer.from_pretrained(folder)`, vLLM and SGLang load it without remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from k2_core.errors import ConfigError

from .chat import CHAT_TEMPLATE, IM_END
from .tokenizer import BOS, EOS, PAD, BpeTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

UNK = "[UNK]"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenization uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiktoken_to_hf_json(tok: TiktokenTokenizer) -> bytes:
    """A tiktoken tokenizer as an HF byte-level BPE tokenizer.json with the same ids: ranks
    become the vocabulary, merges are recovered from the ranks, whole-word hits skip merging
    (`ignore_merges`, as tiktoken does), special tokens are added tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import parse_tiktoken

    ranks = parse_tiktoken(tok._data)
    b2u = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    merges: list[tuple[int, int, str, str]] = []
    for b, r in ranks.items():
        if len(b) < 2:
            continue
        for i in range(1, len(b)):
            a, c = b[:i], b[i:]
            if a in ranks and c in ranks and ranks[a] < r and ranks[c] < r:
                merges.append((r, max(ranks[a], ranks[c]), text(a), text(c)))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab, [(a, c) for _, _, a, c in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok._pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    by_id = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in by_id])
    for t, i in by_id:
        if hf.token_to_id(t) != i:
            raise ConfigError(
                f"tokenizer tiktoken: special token {t} cannot keep id {i} in "
                "tokenizer.json (ids must follow the ranks without gaps)"
            )
    return hf.to_str().encode()


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int | None = None) -> dict[str, bytes]:
    """The HF tokenizer files (name -> bytes) of a k2 tokenizer, with K2's chat template."""
    if isinstance(tok, BpeTokenizer):
        tokenizer_json = tok.serialize()
    elif isinstance(tok, TiktokenTokenizer):
        tokenizer_json = tiktoken_to_hf_json(tok)
    else:
        raise ConfigError(f"tokenizer {tok.name}: no Hugging Face export for this kind")
    special = tok.special_tokens
    named = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    if UNK in special:
        named["unk_token"] = UNK
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    generation = {
        "bos_token_id": special[BOS],
        "eos_token_id": [special[IM_END], special[EOS]],
        "pad_token_id": special[PAD],
    }

    def dump(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(named),
        "generation_config.json": dump(generation),
    }


def export_tokenizer(src: str, run_config: Any, dest: str, tokenizer: str | None) -> list[str]:
    """Write the HF tokenizer files of checkpoint `src` (or of the tokenizer folder
    `tokenizer`) into `dest`; returns their names."""
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        from .inference.resolve import find_tokenizer

        tok = find_tokenizer(src, run_config, build_default=False)  # export builds nothing
    out = Path(dest)
    try:
        model_cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        model_cfg = {}
    vocab = model_cfg.get("vocab_size")
    if vocab is not None and tok.vocab_size > vocab:
        raise ConfigError(
            f"tokenizer of {tokenizer or src}: {tok.vocab_size:,} ids, more than the "
            f"model's vocab_size {vocab:,}; is it the model's tokenizer?"
        )
    files = hf_tokenizer_files(tok, model_cfg.get("max_position_embeddings"))
    for name, data in files.items():
        (out / name).write_bytes(data)
    return sorted(files)
