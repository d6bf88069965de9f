"""The `k2` generator: a k2 checkpoint in this process, behind the shared Generator interface.

Concurrent `chat` / `complete` calls are batched into one engine `generate` (MLA's compressed
KV cache, per-request sampling). Import-light: torch and the model load on first use.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import ChatResult, CompleteResult, make_usage


class LocalOptions(BaseModel):
    """Options of the `k2` generator."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    checkpoint: str = Field(
        ..., min_length=1, description="URI of a saved k2 model or training checkpoint."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder URI; None: the one of the checkpoint's dataset."
    )
    max_batch_size: int = Field(64, gt=0, description="Requests decoded together at most.")
    temperature: float = Field(0.7, ge=0, description="Default sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus mass.")
    max_tokens: int = Field(512, gt=0, description="Default completion token limit.")
    seed: int | None = Field(None, description="Default seed (None: a fresh one per request).")


class LocalGenerator:
    """Chat and text completion from a k2 checkpoint (or an Engine) in this process."""

    def __init__(self, options: LocalOptions, engine: Any = None):
        self.options = options
        self._engine = engine
        self._batcher: Any = None
        self._lock = threading.Lock()

    def _get_batcher(self) -> Any:
        with self._lock:
            if self._batcher is None:
                from ..inference.batcher import Batcher
                from ..inference.engine import Engine

                if self._engine is None:
                    self._engine = Engine.from_checkpoint(
                        self.options.checkpoint,
                        self.options.tokenizer,
                        max_batch_size=self.options.max_batch_size,
                    )
                if self._engine.tokenizer is None:
                    raise ValueError("the k2 generator needs an engine with a tokenizer")
                self._batcher = Batcher(self._engine)
            return self._batcher

    @property
    def engine(self) -> Any:
        """The engine (loaded on first use)."""
        return self._get_batcher().engine

    def _params(
        self,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        stop: list[str] | None,
        seed: int | None,
    ) -> Any:
        from ..inference.engine import SamplingParams

        o = self.options
        return SamplingParams(
            temperature=o.temperature if temperature is None else temperature,
            top_p=o.top_p if top_p is None else top_p,
            max_new_tokens=o.max_tokens if max_tokens is None else max_tokens,
            stop=list(stop or []),
            seed=o.seed if seed is None else seed,
        )

    async def _run(self, prompt: str | Callable[[Any], list[int]], params: Any) -> Any:
        batcher = await asyncio.to_thread(self._get_batcher)  # first call loads the model
        tok = batcher.engine.tokenizer
        ids = prompt(tok) if callable(prompt) else tok.encode(prompt, allow_special=True)
        return await batcher.agenerate(ids, params)

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
        """Render with K2's chat format, generate, parse tool calls into OpenAI form."""
        from ..chat import encode_chat_prompt, parse_assistant

        # synthesis feeds model output back in as messages: encode it as text, control
        # tokens only from the chat structure
        out = await self._run(
            lambda tok: encode_chat_prompt(tok, messages, tools),
            self._params(temperature, top_p, max_tokens, stop, seed),
        )
        message = parse_assistant(out.text or "")
        finish = out.finish_reason
        if finish == "stop" and message.get("tool_calls"):
            finish = "tool_calls"
        return ChatResult(
            message=message,
            finish_reason=finish,
            usage=make_usage(len(out.prompt_ids), len(out.token_ids)),
        )

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
        """Continue `prompt` (special-token strings in it are K2's control tokens)."""
        out = await self._run(prompt, self._params(temperature, top_p, max_tokens, stop, seed))
        return CompleteResult(
            text=out.text or "",
            finish_reason=out.finish_reason,
            usage=make_usage(len(out.prompt_ids), len(out.token_ids)),
        )

    async def aclose(self) -> None:
        """Stop the batching thread."""
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.close)


def build_local(*, options: LocalOptions) -> LocalGenerator:
    """A k2 checkpoint in this process: batched, KV-cached sampling (the `k2` generator)."""
    return LocalGenerator(options)
