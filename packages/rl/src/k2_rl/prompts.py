"""RL task records: built-in arithmetic, generated Python exercises, or JSON Lines files.

A record carries what its reward needs ({"prompt", "answer"} for math, {"prompt", "tests",
"entry_point"} for code) plus "messages", the conversation the policy answers. Streams are
deterministic per (seed, task) and resumable by the count of records drawn.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

from k2_core.errors import ConfigError

from .options import TaskOptions


def math_records(
    split: str, seed: int, difficulty: tuple[int, int], kinds: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    """Endless built-in arithmetic records of `split` (train/val/test never share a question)."""
    from k2_data.corpus.mathgen import iter_math_problems

    for p in iter_math_problems(split, seed, tuple(difficulty), tuple(kinds)):
        yield {
            "prompt": p.question,
            "answer": p.answer,
            "messages": [{"role": "user", "content": p.question}],
        }


CODE_INSTRUCTION = "Complete this Python function. Answer with the whole function.\n\n"


def code_records(split: str, seed: int) -> Iterator[dict[str, Any]]:
    """Endless generated Python exercises with assert tests (val draws a different seed)."""
    from .evaluation.exercises import generate_exercises

    base = seed * 2 + (1 if split != "train" else 0) + 7919
    for block in itertools.count():
        for ex in generate_exercises(64, seed=base * 1000 + block):
            text = CODE_INSTRUCTION + ex.prompt
            yield {
                "prompt": text,
                "tests": list(ex.tests),
                "entry_point": ex.name,
                "messages": [{"role": "user", "content": text}],
            }


def jsonl_records(uri: str, seed: int) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file, shuffled per pass (seeded), endlessly."""
    import json

    import fsspec

    try:
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"rl.tasks.uri: {uri}: no such file") from None
    if not recs:
        raise ConfigError(f"rl.tasks.uri: {uri}: no records")
    for i, r in enumerate(recs):
        if "messages" not in r:
            if "prompt" not in r:
                raise ConfigError(f"{uri}: record {i} has neither 'messages' nor 'prompt'")
            r["messages"] = [{"role": "user", "content": r["prompt"]}]
    for epoch in itertools.count():
        order = list(range(len(recs)))
        random.Random(seed * 7 + epoch).shuffle(order)
        for i in order:
            yield recs[i]


def task_records(task: TaskOptions, split: str, seed: int) -> Iterator[dict[str, Any]]:
    """The record stream of `task` for `split`."""
    if task.source == "math":
        return math_records(split, seed, task.difficulty, task.kinds)
    if task.source == "code":
        return code_records(split, seed)
    if task.uri is None:
        raise ConfigError(f"rl.tasks[{task.name}].uri: required for source jsonl")
    return jsonl_records(task.uri, seed + (0 if split == "train" else 1))


class PromptStream:
    """Draws (record, prompt ids, task, budget) across tasks by weight; resumable."""

    def __init__(
        self,
        tasks: tuple[TaskOptions, ...],
        encode: Any,
        seed: int,
        default_budget: int,
        split: str = "train",
    ):
        self.tasks, self.encode, self.seed = tasks, encode, seed
        self.default_budget, self.split = default_budget, split
        self.drawn = 0
        self._reset()

    def _reset(self) -> None:
        self._streams = [task_records(t, self.split, self.seed) for t in self.tasks]
        self._counts = [0] * len(self.tasks)
        self._rng = random.Random(self.seed)

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> tuple[dict[str, Any], list[int], str, int | None]:
        weights = [t.weight for t in self.tasks]
        i = self._rng.choices(range(len(self.tasks)), weights)[0]
        record = next(self._streams[i])
        self._counts[i] += 1
        self.drawn += 1
        task = self.tasks[i]
        return (
            record,
            self.encode(record["messages"]),
            task.name,
            task.budget or self.default_budget,
        )

    def state_dict(self) -> dict[str, Any]:
        """Records drawn so far (a resume replays the streams to that point)."""
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fast-forward to `state_dict()`'s position."""
        self.drawn = 0
        self._reset()
        for _ in range(int(state["drawn"])):
            i = self._rng.choices(range(len(self.tasks)), [t.weight for t in self.tasks])[0]
            next(self._streams[i])
            self._counts[i] += 1
            self.drawn += 1
