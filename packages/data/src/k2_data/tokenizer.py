"""Tokenizers behind one small interface: byte-level BPE (HF `tokenizers`) and tiktoken files.

Both reserve K2's chat/tool-call special tokens. A tokenizer saves to a folder URI:
    k2_tokenizer.json        {"name", "file", "content_hash", ...}: what `load_tokenizer` reads
    tokenizer.json           (bpe) the HF tokenizers serialization
    tokenizer.tiktoken       (tiktoken) base64 token + space + rank per line
`content_hash` is the sha256 of the serialized tokenizer (file bytes plus special tokens).
"""

from __future__ import annotations

import base64
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field

# K2's special tokens in its own id order; k2's own tokenizers reserve the same names.
K2_SPECIAL_IDS: dict[str, int] = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "[UNK]": 163838,  # from K2's tokenizer_config.json
    "[PAD]": 163839,
}
K2_NUM_BASE = 163584  # mergeable ranks of K2's tiktoken file; 256 reserved ids follow
K2_VOCAB = 163840
SPECIAL_TOKENS: tuple[str, ...] = (
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "[PAD]",
)
BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"

# K2's pre-tokenization regex (tokenization_kimi.py); "cl100k" is GPT-4's.
PATTERNS = {
    "kimi": "|".join(
        [
            r"""[\p{Han}]+""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    "cl100k": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    ),
}
# Split regex for HF byte-level BPE (oniguruma: no `&&`), GPT-4 style.
_HF_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

META = "k2_tokenizer.json"


class Tokenizer(ABC):
    """What every k2 tokenizer offers; datasets record `name` and `content_hash`."""

    name: str = "?"
    special_tokens: dict[str, int]

    @abstractmethod
    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """Token ids of each text; special-token strings in the text are plain text unless
        `allow_special` (documents cannot inject control tokens)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (every id < vocab_size)."""

    @abstractmethod
    def serialize(self) -> bytes:
        """The file bytes that define this tokenizer (what `save` writes)."""

    @abstractmethod
    def _files(self) -> dict[str, bytes]:
        """Files (name -> bytes) written by `save` besides the meta file."""

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of one text."""
        return self.encode_batch([text], allow_special=allow_special)[0]

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """`decode` of each id list."""
        return [self.decode(ids) for ids in batch]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD]

    @property
    def content_hash(self) -> str:
        """sha256 of the serialized tokenizer and its special-token table."""
        h = hashlib.sha256(self.serialize())
        h.update(json.dumps(self.special_tokens, sort_keys=True).encode())
        return h.hexdigest()

    def _meta(self) -> dict[str, Any]:
        return {
            "format": "k2-tokenizer",
            "name": self.name,
            "files": sorted(self._files()),
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "content_hash": self.content_hash,
        }

    def save(self, uri: str) -> str:
        """Write this tokenizer into the folder `uri` (meta file last); returns `uri`."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        path = path.rstrip("/")
        fs.makedirs(path, exist_ok=True)
        for name, data in self._files().items():
            with fs.open(f"{path}/{name}", "wb") as f:
                f.write(data)
        with fs.open(f"{path}/{META}", "w") as f:
            json.dump(self._meta(), f, indent=2, sort_keys=True)
        return uri

    def state(self) -> tuple[str, dict[str, Any]]:
        """A picklable recipe to rebuild this tokenizer in a worker process."""
        return self.name, {"files": self._files(), "special_tokens": self.special_tokens}


# -- byte-level BPE (HF tokenizers) --------------------------------------------------------


class BpeOptions(BaseModel):
    """Options of the byte-level BPE tokenizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    vocab_size: int = Field(8192, ge=300, description="Vocabulary size, special tokens included.")
    path: str | None = Field(
        None,
        description="Load this tokenizer.json (or saved k2 tokenizer folder) instead of training.",
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a merge when training.")


class BpeTokenizer(Tokenizer):
    """Byte-level BPE over HF `tokenizers`, with K2's special tokens as added tokens."""

    name = "bpe"

    def __init__(self, tok: Any):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = tok
        self._json = tok.to_str().encode()
        # Two encoders, one per special-token mode, fixed at build time: toggling one shared
        # flag per call let a concurrent allow_special=True call (another thread of `k2 serve`)
        # turn special-token strings in user text into control tokens.
        tok.encode_special_tokens = False
        self._plain = HFTokenizer.from_str(self._json.decode())
        self._plain.encode_special_tokens = True
        self.special_tokens = {}
        for t in SPECIAL_TOKENS:
            i = tok.token_to_id(t)
            if i is None:
                raise ConfigError(f"bpe tokenizer lacks the special token {t}")
            self.special_tokens[t] = i

    @classmethod
    def from_bytes(cls, data: bytes) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(data.decode()))

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
    ) -> BpeTokenizer:
        """Train on `texts`; the special tokens get the first ids."""
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_HF_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def hf(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain
        encs = (
            tok.encode_batch_fast(texts, add_special_tokens=False)
            if hasattr(tok, "encode_batch_fast")
            else tok.encode_batch(texts, add_special_tokens=False)
        )
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=False)

    def serialize(self) -> bytes:
        return self._json

    def _files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self._json}


def build_bpe(texts: Iterable[str] | None = None, *, options: BpeOptions) -> BpeTokenizer:
    """Byte-level BPE (HF tokenizers) trained on a sample of the sources, K2 special tokens."""
    if options.path:
        return (
            load_tokenizer(options.path)
            if not options.path.endswith(".json")
            else BpeTokenizer.from_bytes(_read_bytes(options.path))
        )  # type: ignore[return-value]
    if texts is None:
        raise ConfigError("tokenizer bpe: needs `path` or documents to train on")
    return BpeTokenizer.train(texts, options.vocab_size, options.min_frequency)


# -- tiktoken files ------------------------------------------------------------------------


class TiktokenOptions(BaseModel):
    """Options of the tiktoken-file tokenizer (a real K2 tiktoken.model works)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(..., description="fsspec URI of the tiktoken BPE file (base64 token, rank).")
    pattern: str = Field(
        "kimi", description="Pre-tokenization regex: `kimi`, `cl100k`, or a regex of your own."
    )
    special_tokens: dict[str, int] | None = Field(
        None,
        description="Special token name -> id; default: K2's ids for a K2-sized vocabulary "
        "(163584 ranks), else K2's names appended after the last rank.",
    )


def parse_tiktoken(data: bytes) -> dict[bytes, int]:
    """Mergeable ranks of a tiktoken file."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise ConfigError(f"tiktoken file: line {n} is not `base64token rank`") from None
    if not ranks:
        raise ConfigError("tiktoken file: no tokens")
    return ranks


def default_tiktoken_specials(n_ranks: int) -> tuple[dict[str, int], int]:
    """(special tokens, vocab size) for a file of `n_ranks` mergeable ranks."""
    if n_ranks == K2_NUM_BASE:
        specials = dict(K2_SPECIAL_IDS)
        taken = set(specials.values())
        for i in range(K2_NUM_BASE, K2_VOCAB):  # K2's other reserved ids
            if i not in taken:
                specials[f"<|reserved_token_{i - K2_NUM_BASE}|>"] = i
        return specials, K2_VOCAB
    specials = {t: n_ranks + i for i, t in enumerate(SPECIAL_TOKENS)}
    return specials, n_ranks + len(SPECIAL_TOKENS)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken-format BPE file plus special tokens."""

    name = "tiktoken"

    def __init__(
        self, data: bytes, special_tokens: dict[str, int] | None = None, pattern: str = "kimi"
    ):
        import tiktoken

        self._data = data
        ranks = parse_tiktoken(data)
        if special_tokens is None:
            special_tokens, vocab = default_tiktoken_specials(len(ranks))
        else:
            vocab = max([*ranks.values(), *special_tokens.values()]) + 1
        missing = [t for t in (BOS, EOS, PAD) if t not in special_tokens]
        if missing:
            raise ConfigError(f"tokenizer tiktoken: special_tokens lack {', '.join(missing)}")
        self.special_tokens = dict(special_tokens)
        self._pattern = PATTERNS.get(pattern, pattern)
        self._vocab = vocab
        self._enc = tiktoken.Encoding(
            "k2", pat_str=self._pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._decoder = {v: k.encode() for k, v in self.special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        if allow_special:
            return self._enc.encode_batch(texts, allowed_special="all", disallowed_special=())
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def serialize(self) -> bytes:
        return self._data + b"\n#pattern " + self._pattern.encode()

    def _files(self) -> dict[str, bytes]:
        return {"tokenizer.tiktoken": self._data}

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "pattern": self._pattern}

    def state(self) -> tuple[str, dict[str, Any]]:
        name, st = super().state()
        return name, {**st, "pattern": self._pattern}


def build_tiktoken(*, options: TiktokenOptions) -> TiktokenTokenizer:
    """A tiktoken BPE file (e.g. K2's tiktoken.model) with K2's special tokens."""
    return TiktokenTokenizer(_read_bytes(options.path), options.special_tokens, options.pattern)


# -- saving and loading --------------------------------------------------------------------


def _read_bytes(uri: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{uri}: cannot read ({e})") from None


def from_state(name: str, state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.state()` (in a worker process)."""
    files = state["files"]
    if name == "bpe":
        return BpeTokenizer.from_bytes(files["tokenizer.json"])
    if name == "tiktoken":
        return TiktokenTokenizer(
            files["tokenizer.tiktoken"], state["special_tokens"], state.get("pattern", "kimi")
        )
    raise ConfigError(f"unknown tokenizer kind {name!r}")


def load_tokenizer(uri: str) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save(uri)`; checks its content hash."""
    meta_bytes = _read_bytes(f"{uri.rstrip('/')}/{META}")
    meta = json.loads(meta_bytes)
    files = {n: _read_bytes(f"{uri.rstrip('/')}/{n}") for n in meta["files"]}
    tok = from_state(
        meta["name"],
        {
            "files": files,
            "special_tokens": meta["special_tokens"],
            "pattern": meta.get("pattern", "kimi"),
        },
    )
    if tok.content_hash != meta["content_hash"]:
        raise ConfigError(f"{uri}: tokenizer content hash mismatch (corrupt or edited)")
    return tok
