"""Text in, text out through k2's KV-cache engine (k2_data.inference), in batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def complete(
    target: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    n: int = 1,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[str]]:
    """`n` completions of each prompt (greedy when temperature is 0), cut at the first stop
    string or the end-of-sequence token; returned per prompt."""
    from k2_data.inference.engine import SamplingParams

    tok = target.tokenizer
    ids = tok.encode_batch(prompts)
    flat = [p for p in ids for _ in range(n)]
    # One seed per request: the engine then gives it the same tokens whatever its batch.
    params = [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop=list(stop),
            stop_token_ids=[tok.eos_id],
            seed=seed * 1_000_003 + j,
        )
        for j in range(len(flat))
    ]
    engine = target.engine(batch_size)
    texts = [cut_at_stop(c.text or "", stop) for c in engine.generate(flat, params)]
    return [texts[j * n : (j + 1) * n] for j in range(len(prompts))]
