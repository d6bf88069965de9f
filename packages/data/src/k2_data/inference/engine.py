"""Batched generation from a k2 model with MLA's compressed KV cache.

One `generate` call: prompts (token ids) are grouped into batches of `max_batch_size`, each
batch prefilled once (right-padded; causal attention never looks at the padding), then
decoded one token per step from the cache. Rows that finish (a stop token, a stop string,
their token budget) leave the batch and the cache. Sampling is per request (temperature,
top-p, seed); a seeded request gets the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tokenizer import EOS, Tokenizer
from .sampling import choose_tokens

IM_END = "<|im_end|>"


@dataclass
class SamplingParams:
    """How one request is sampled; temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # Called from the generating thread with each new token id of a row still running
    # (streaming); not called for the token that finishes it.
    on_token: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    # Alternatives to report per generated token: the `top_logprobs` most likely tokens with
    # their raw log-probabilities (0: none).
    top_logprobs: int = 0
    # Generate past the default stop tokens (<|im_end|>, [EOS]) up to max_new_tokens, as
    # vLLM's ignore_eos: load tests and benchmarks need outputs of a known length.
    ignore_eos: bool = False
    # Set (from any thread) when nobody wants the result any more, e.g. the HTTP client went
    # away: the row leaves its batch at the next decode step with finish_reason "cancelled".
    cancel: threading.Event | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass
class Completion:
    """One generated sequence: its tokens with log pi(token) at temperature 1 (raw logits)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str | None = None
    # Per token, the (token id, log pi) of the params' top_logprobs most likely tokens
    # (temperature 1, raw logits, like `logprobs`); None when none were asked for.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # The engine's weights version that generated it (read under the engine's lock, so a
    # weight load racing the generation cannot mislabel it).
    version: int = -1


class _Row:
    """Host-side state of one request in a batch."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, stop_ids: set[int]):
        self.index = index
        self.prompt = prompt
        self.params = params
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.finish: str | None = None
        self.text_end: int | None = None  # where a stop string starts in the decoded text
        self.text_len = 0  # decoded length before the latest token (stop-string search)


class Engine:
    """Generates from a k2 model with a KV cache; `load_weights` swaps in new weights."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch_size: int = 64,
        dtype: torch.dtype | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if dtype is not None:
            model = model.to(dtype)
        self.model = model  # switched to eval mode only while generating (it may be shared)
        self.vocab_size = int(model.config.vocab_size)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.version = 0
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.default_stop_ids: list[int] = []
        if tokenizer is not None:
            special = tokenizer.special_tokens
            self.default_stop_ids = [special[t] for t in (IM_END, EOS) if t in special]
        # The model is shared: one generate or weight load at a time (serve runs them in threads).
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, uri: str, tokenizer: Tokenizer | str | None = None, **kwargs: Any
    ) -> Engine:
        """An engine over a saved model or training checkpoint, with the tokenizer of the
        dataset it was trained on when none is given (or a tokenizer folder URI)."""
        from k2_core.modelio import load_checkpoint_model

        from .resolve import find_tokenizer

        model, run_cfg = load_checkpoint_model(uri)
        if isinstance(tokenizer, str):
            from ..tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        elif tokenizer is None:
            tokenizer = find_tokenizer(uri, run_cfg)
        return cls(model, tokenizer, **kwargs)

    # --- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy `state` (all or some of the model's parameters/buffers) in; set `version`."""
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"load_weights: not a tensor of this model: {unknown[0]}")
        with self._lock:
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(
                        f"load_weights: {name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(own[name].shape)}"
                    )
                own[name].copy_(tensor)
            self.version = version

    # --- generation --------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Complete every prompt; results in prompt order."""
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        rows = []
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompt {i}: token ids must be in [0, {self.vocab_size})")
            if len(p) + sp.max_new_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_new_tokens "
                    f"{sp.max_new_tokens} exceed the model's {self.max_positions}"
                )
            sp_seed = sp.seed if sp.seed is not None else random.getrandbits(63)
            stop_ids = set(sp.stop_token_ids) | (
                set() if sp.ignore_eos else set(self.default_stop_ids)
            )
            rows.append((_Row(i, list(p), sp, stop_ids), sp_seed))
        # Similar lengths share a batch (less padding); results do not depend on the grouping.
        rows.sort(key=lambda r: len(r[0].prompt))
        with self._lock, torch.inference_mode():
            was_training = self.model.training
            version = self.version  # load_weights takes the same lock: one version throughout
            self.model.eval()
            try:
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start : start + self.max_batch_size]
                    self._run_batch([r for r, _ in chunk], [s for _, s in chunk])
            finally:
                self.model.train(was_training)
        done = sorted((r for r, _ in rows), key=lambda r: r.index)
        return [self._completion(r, version) for r in done]

    def _completion(self, row: _Row, version: int) -> Completion:
        text = None
        if self.tokenizer is not None:
            body = row.tokens
            if row.finish == "stop" and row.text_end is None and body and body[-1] in row.stop_ids:
                body = body[:-1]  # the stop token ends the text, it is not part of it
            text = self.tokenizer.decode(body)
            if row.text_end is not None:
                text = text[: row.text_end]
        return Completion(
            prompt_ids=row.prompt,
            token_ids=row.tokens,
            logprobs=row.logprobs,
            finish_reason=row.finish or "length",
            text=text,
            top_logprobs=row.top if row.params.top_logprobs else None,
            version=version,
        )

    def _run_batch(self, rows: list[_Row], seeds: list[int]) -> None:
        """Prefill then decode one batch until every row has finished."""
        model = self.model
        device = model.lm_head.weight.device
        for r in rows:
            if r.params.max_new_tokens == 0:
                r.finish = "length"
            elif r.params.cancel is not None and r.params.cancel.is_set():
                r.finish = "cancelled"
        seeds = [s for r, s in zip(rows, seeds, strict=True) if r.finish is None]
        rows = [r for r in rows if r.finish is None]
        if not rows:
            return
        lens = [len(r.prompt) for r in rows]
        budget = max(r.params.max_new_tokens for r in rows)
        ids = torch.zeros(len(rows), max(lens), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lens[i]] = torch.tensor(r.prompt)
        ids = ids.to(device)
        cache = model.new_cache(len(rows), max(lens) + budget)
        lens_t = torch.tensor(lens, device=device)
        # equal prompt lengths: no padding, so the cache knows its rows stay aligned (slice
        # writes, no per-step mask)
        hidden = model.model(
            ids, cache=cache, new_lengths=lens_t if min(lens) < max(lens) else None
        )
        last = hidden[torch.arange(len(rows), device=device), lens_t - 1]
        logits = model.lm_head(last)

        temperature = torch.tensor([r.params.temperature for r in rows], device=device)
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)
        seed_t = torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.long, device=device)
        step = 0
        any_sampled = any(r.params.temperature > 0 for r in rows)
        any_top_p = any(r.params.top_p < 1 for r in rows)
        while rows:
            # the step counter only feeds the sampled rows' uniforms: no tensor when greedy
            steps = (
                torch.full((len(rows),), step, dtype=torch.long, device=device)
                if any_sampled
                else None
            )
            tokens = choose_tokens(
                logits,
                temperature,
                top_p,
                seed_t,
                steps,
                any_sampled=any_sampled,
                any_top_p=any_top_p,
            )
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            logp = logp_all.gather(1, tokens[:, None])[:, 0]
            k = max(r.params.top_logprobs for r in rows)
            tops: list[Any] = [None] * len(rows)
            if k:
                top_v, top_i = logp_all.topk(min(k, logp_all.shape[-1]), dim=-1)
                tops = [
                    list(zip(ti, tv, strict=True))
                    for ti, tv in zip(top_i.tolist(), top_v.tolist(), strict=True)
                ]
            keep = []
            for i, (r, tok, lp) in enumerate(
                zip(rows, tokens.tolist(), logp.tolist(), strict=True)
            ):
                if r.params.cancel is not None and r.params.cancel.is_set():
                    r.finish = "cancelled"  # its client is gone: free the slot, keep no token
                    continue
                r.tokens.append(tok)
                r.logprobs.append(lp)
                if r.params.top_logprobs:
                    r.top.append(tops[i][: r.params.top_logprobs])
                self._check_finished(r, tok)
                if r.finish is None:
                    keep.append(i)
                    if r.params.on_token is not None:
                        r.params.on_token(tok)
            step += 1
            if not keep:
                break
            if len(keep) != len(rows):
                idx = torch.tensor(keep, device=device)
                cache.select(idx)
                tokens, temperature, top_p, seed_t = (
                    t.index_select(0, idx) for t in (tokens, temperature, top_p, seed_t)
                )
                rows = [rows[i] for i in keep]
                any_sampled = any(r.params.temperature > 0 for r in rows)
                any_top_p = any(r.params.top_p < 1 for r in rows)
            # the stack and the head only: no loss or aux-loss bookkeeping per token
            logits = model.lm_head(model.model(tokens[:, None], cache=cache)[:, -1])

    def _check_finished(self, r: _Row, tok: int) -> None:
        """Mark `r` finished by a stop token, a stop string or its token budget."""
        if tok in r.stop_ids:
            r.finish = "stop"
            return
        if r.params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(r.tokens)
            longest = max(len(s) for s in r.params.stop)
            # only the tail can hold a stop string completed by this token
            lo = max(0, r.text_len - longest + 1)
            r.text_len = len(text)
            hits = [p for p in (text.find(s, lo) for s in r.params.stop if s) if p >= 0]
            if hits:
                r.finish, r.text_end = "stop", min(hits)
                return
        if len(r.tokens) >= r.params.max_new_tokens:
            r.finish = "length"
