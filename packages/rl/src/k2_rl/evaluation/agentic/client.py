"""A raw OpenAI-compatible chat client for the endpoint under test.

Unlike the `openai` generator (which retries and raises on anything malformed), this client
never raises on what the endpoint says: every reply becomes a `Reply` whose `error` names the
protocol failure, because the evaluations count those failures rather than hide them.
Streams are reassembled into the same message shape as a non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any


def normalize_base_url(url: str) -> str:
    """`http://host:port` or `.../v1` -> the API root ending in `/v1` (vLLM, SGLang, k2 serve)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") or "/v1/" in url else url + "/v1"


@dataclass
class Reply:
    """One chat answer as the endpoint gave it (`error` set when there is no usable answer)."""

    message: dict[str, Any] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # http_error, connection, timeout, malformed_response, stream_error
    detail: str = ""
    seconds: float = 0.0
    chunks: int = 0  # SSE data chunks (streamed replies)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able copy for reports and transcripts."""
        return {
            "message": self.message,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "detail": self.detail[:300],
            "seconds": round(self.seconds, 4),
            "chunks": self.chunks,
        }


def _message_of(body: Any) -> tuple[dict[str, Any] | None, str | None, str]:
    """(message, finish_reason, problem) of a non-streamed chat body."""
    if not isinstance(body, dict):
        return None, None, "the body is not a JSON object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None, "the body has no choices"
    msg = choices[0].get("message")
    if not isinstance(msg, dict):
        return None, None, "the choice has no message"
    return msg, choices[0].get("finish_reason"), ""


class StreamAssembler:
    """Folds OpenAI chat.completion.chunk deltas into one message (content concatenated,
    tool calls merged by their `index`: the first delta brings id and name, later ones append
    argument text)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.role: str | None = None
        self.chunks = 0

    def add(self, chunk: Any) -> None:
        """Fold one parsed chunk; ValueError when it is not a chat chunk."""
        if not isinstance(chunk, dict):
            raise ValueError("a chunk is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            raise ValueError(f"the stream carried an error: {json.dumps(chunk['error'])[:200]}")
        self.chunks += 1
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or []:
            if not isinstance(ch, dict):
                raise ValueError("a choice is not a JSON object")
            delta = ch.get("delta") or {}
            if not isinstance(delta, dict):
                raise ValueError("a delta is not a JSON object")
            self.role = delta.get("role") or self.role
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                if not isinstance(tc, dict):
                    raise ValueError("a tool-call delta is not a JSON object")
                idx = tc.get("index", len(self.calls))
                slot = self.calls.setdefault(
                    idx, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if isinstance(fn.get("name"), str):
                    slot["function"]["name"] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    slot["function"]["arguments"] += fn["arguments"]
            if ch.get("finish_reason") is not None:
                self.finish_reason = ch["finish_reason"]

    def message(self) -> dict[str, Any]:
        """The reassembled assistant message."""
        text = "".join(self.content)
        msg: dict[str, Any] = {"role": self.role or "assistant", "content": text or None}
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return msg


class ChatClient:
    """POST /chat/completions to one endpoint, plain or streamed, with bounded concurrency."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        concurrency: int = 8,
    ):
        import httpx

        self.base_url = normalize_base_url(base_url)
        self.model = model
        key = os.environ.get(api_key_env) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # one connection per concurrent request: a stream holds its connection to the end
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(
            base_url=self.base_url + "/", headers=headers, timeout=timeout_s, limits=limits
        )
        self.sem = asyncio.Semaphore(concurrency)

    async def chat(self, payload: dict[str, Any], *, stream: bool = False) -> Reply:
        """One chat request (`model` and `stream` are set here); never raises on the reply."""
        import httpx

        body = {**payload, "model": self.model, "stream": stream}
        t0 = time.perf_counter()
        async with self.sem:
            try:
                if stream:
                    rep = await self._stream(body)
                else:
                    rep = self._plain(await self.http.post("chat/completions", json=body))
            except httpx.TimeoutException as e:
                rep = Reply(error="timeout", detail=type(e).__name__)
            except httpx.TransportError as e:
                rep = Reply(error="connection", detail=f"{type(e).__name__}: {e}")
        rep.seconds = time.perf_counter() - t0
        return rep

    @staticmethod
    def _plain(r: Any) -> Reply:
        if r.status_code != 200:
            return Reply(error="http_error", detail=f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            body = r.json()
        except ValueError:
            return Reply(error="malformed_response", detail="the body is not JSON")
        msg, finish, problem = _message_of(body)
        if problem:
            return Reply(error="malformed_response", detail=problem)
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Reply(message=msg, finish_reason=finish, usage=usage)

    async def _stream(self, body: dict[str, Any]) -> Reply:
        asm = StreamAssembler()
        body = {**body, "stream_options": {"include_usage": True}}
        async with self.http.stream("POST", "chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Reply(error="http_error", detail=f"HTTP {r.status_code}: {text[:300]}")
            done = False
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    asm.add(json.loads(data))
            except ValueError as e:
                return Reply(error="stream_error", detail=str(e)[:300], chunks=asm.chunks)
        if not done:
            return Reply(
                error="stream_error", detail="the stream ended without [DONE]", chunks=asm.chunks
            )
        return Reply(
            message=asm.message(),
            finish_reason=asm.finish_reason,
            usage=asm.usage,
            chunks=asm.chunks,
        )

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()
