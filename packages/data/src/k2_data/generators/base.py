"""The interface every `generator` implementation offers (k2 checkpoint, OpenAI endpoint, ...).

Pipelines call `chat` / `complete` and read `ChatResult` / `CompleteResult`; usage dicts use
OpenAI's keys (prompt_tokens, completion_tokens, total_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI-style usage dict."""
    return {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "total_tokens": int(prompt_tokens) + int(completion_tokens),
    }


@dataclass
class ChatResult:
    """One chat completion: the assistant message (OpenAI-style dict, may hold tool_calls)."""

    message: dict[str, Any]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: dict[str, int] = field(default_factory=lambda: make_usage(0, 0))


@dataclass
class CompleteResult:
    """One plain-text completion."""

    text: str
    finish_reason: str  # "stop" | "length"
    usage: dict[str, int] = field(default_factory=lambda: make_usage(0, 0))


@runtime_checkable
class Generator(Protocol):
    """What a `generator` slot implementation returns: async chat and text completion."""

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> ChatResult:
        """Complete a conversation; None arguments fall back to the generator's defaults."""
        ...

    async def complete(
        self,
        prompt: str,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> CompleteResult:
        """Continue a plain-text prompt; None arguments fall back to the generator's defaults."""
        ...

    async def aclose(self) -> None:
        """Release connections, models and threads."""
        ...
