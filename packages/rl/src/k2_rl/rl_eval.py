"""Held-out pass@1 of a policy: one greedy answer per held-out prompt, scored by the task's
reward."""

from __future__ import annotations

from typing import Any

from .options import TaskOptions
from .prompts import task_records


def response_text(tokenizer: Any, token_ids: list[int], stop_ids: set[int]) -> str:
    """The decoded response without its closing stop token."""
    if token_ids and token_ids[-1] in stop_ids:
        token_ids = token_ids[:-1]
    return tokenizer.decode(token_ids)


def prompt_encoder(tokenizer: Any) -> Any:
    """messages -> token ids of the K2 chat prompt ending with the assistant header."""
    from k2_data.chat import encode_chat_prompt

    def encode(messages: list[dict[str, Any]]) -> list[int]:
        # content as text, control tokens from the structure (no injection from a prompt)
        return encode_chat_prompt(tokenizer, messages)

    return encode


def pass_at_1(
    engine: Any,
    tokenizer: Any,
    task: TaskOptions,
    reward: Any,
    *,
    n: int,
    max_tokens: int,
    split: str = "test",
    seed: int = 0,
    temperature: float = 0.0,
    samples: int = 1,
) -> dict[str, Any]:
    """pass@1 over the first `n` held-out records of `task` (mean response tokens; `passed`
    holds each answer's outcome, record by record, samples of a record adjacent).

    Greedy by default; with `temperature` > 0 it is the mean success of `samples` seeded
    samples per record (the probability that one sampled answer is right).
    """
    from k2_data.inference.engine import SamplingParams

    stream = task_records(task, split, seed)
    records = [next(stream) for _ in range(n)]
    encode = prompt_encoder(tokenizer)
    k = samples if temperature > 0 else 1
    prompts = [encode(r["messages"]) for r in records for _ in range(k)]
    params = [
        SamplingParams(
            temperature=temperature,
            max_new_tokens=max_tokens,
            seed=seed * 1_000_003 + i if temperature > 0 else None,
        )
        for i in range(len(prompts))
    ]
    outs = engine.generate(prompts, params)
    stop = set(engine.default_stop_ids)
    passed = []
    for i, out in enumerate(outs):
        (res,) = reward.score(records[i // k], [response_text(tokenizer, out.token_ids, stop)])
        passed.append(res.outcome == "pass")
    return {
        "pass@1": sum(passed) / max(len(outs), 1),
        "response_tokens": sum(len(o.token_ids) for o in outs) / max(len(outs), 1),
        "passed": passed,
    }
