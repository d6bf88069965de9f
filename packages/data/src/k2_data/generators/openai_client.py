"""The `openai` generator: any OpenAI-compatible endpoint (vLLM, SGLang, `k2 serve`, a hosted
API) over httpx, with bounded concurrency, retries and classified errors.

Retried (exponential backoff with jitter; a 429's Retry-After is honoured): 429, 5xx,
timeouts, connection errors and malformed responses (garbage JSON, no choices). Not retried:
other 4xx (`client_error`, `auth`) and `truncated` (finish_reason `length` while
`allow_truncated` is off). Every failure raises `GenerationError` whose `error_kind` the
pipelines count by. The API key is read from the environment once and never printed.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import ssl
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import ChatResult, CompleteResult, make_usage

ERROR_KINDS = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "malformed",
    "truncated",
    "client_error",
    "auth",
)
POOL_SIZE = 4  # connections per httpx pool (see OpenAIGenerator._ensure)
RETRYABLE = frozenset({"rate_limited", "server_error", "timeout", "connection", "malformed"})


class GenerationError(Exception):
    """A generator call that failed; `error_kind` is one of ERROR_KINDS."""

    def __init__(
        self,
        error_kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{error_kind}: {message}")
        self.error_kind = error_kind
        self.status = status
        self.retry_after = retry_after


class OpenAIOptions(BaseModel):
    """Options of the `openai` generator."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="Endpoint root including /v1 (vLLM, SGLang, k2 serve, ...).",
    )
    model: str | None = Field(None, description="Model name; None: the first of GET /models.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (may be unset)."
    )
    max_concurrency: int = Field(16, gt=0, description="Requests in flight at most.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one HTTP request, seconds.")
    max_retries: int = Field(4, ge=0, description="Retries of a retryable failure per call.")
    backoff: float = Field(0.5, ge=0, description="First retry delay, seconds; doubles per retry.")
    backoff_max: float = Field(30.0, ge=0, description="Cap of one retry delay, seconds.")
    jitter: float = Field(
        0.25, ge=0, le=1, description="Random extra fraction of each delay (spreads retries)."
    )
    temperature: float = Field(0.7, ge=0, description="Default sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus mass.")
    max_tokens: int = Field(1024, gt=0, description="Default completion token limit.")
    allow_truncated: bool = Field(
        False, description="Accept finish_reason `length`; off: raise `truncated`."
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _classify_status(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status >= 500:
        return "server_error"
    return "client_error"


def _usage(body: dict[str, Any]) -> dict[str, int]:
    u = body.get("usage")
    if not isinstance(u, dict):
        return make_usage(0, 0)
    try:
        return make_usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return make_usage(0, 0)


def _first_choice(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GenerationError("malformed", f"response is a {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GenerationError("malformed", "response has no choices")
    return choices[0]


def _check_message(msg: Any) -> dict[str, Any]:
    """The assistant message, its tool calls checked for the fields callers rely on."""
    if not isinstance(msg, dict):
        raise GenerationError("malformed", "choice has no message")
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise GenerationError("malformed", "message content is not a string")
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise GenerationError("malformed", "tool_calls is not a list")
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise GenerationError("malformed", "a tool call lacks function.name/arguments")
    out = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = calls
    return out


class OpenAIGenerator:
    """An OpenAI-compatible chat/completions client; counts usage, requests and errors."""

    def __init__(self, options: OpenAIOptions):
        self.options = options
        self.name = "openai"
        self._key = os.environ.get(options.api_key_env) or None
        self._model = options.model
        self._clients: list[Any] = []
        self._rr = 0
        self._loop: Any = None
        self._sem: asyncio.Semaphore | None = None
        self.usage: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # every failed attempt, retried or not

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAIGenerator(base_url={self.options.base_url!r}, model={self._model!r})"

    def describe(self) -> dict[str, Any]:
        """Provenance: which endpoint and model produced a record."""
        return {"name": "openai", "base_url": self.options.base_url, "model": self._model}

    def _ensure(self) -> Any:
        """A client of the running loop's pools (new ones after a loop change), round-robin.

        httpcore scans every connection of a pool per request, which at 32+ connections costs
        more CPU than the request itself; pools of POOL_SIZE connections keep that flat.
        """
        import httpx

        loop = asyncio.get_running_loop()
        if not self._clients or self._loop is not loop:
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            n = -(-self.options.max_concurrency // POOL_SIZE)
            limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
            tls = ssl.create_default_context()  # loading CA certificates once, not per pool
            self._clients = [
                httpx.AsyncClient(
                    base_url=self.options.base_url.rstrip("/") + "/",
                    headers=headers,
                    timeout=self.options.timeout_s,
                    limits=limits,
                    verify=tls,
                )
                for _ in range(n)
            ]
            self._sem = asyncio.Semaphore(self.options.max_concurrency)
            self._loop = loop
        self._rr += 1
        return self._clients[self._rr % len(self._clients)]

    async def _send_once(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        """One request (POST with `payload`, else GET); the JSON body or a GenerationError."""
        import httpx

        client = self._ensure()
        assert self._sem is not None
        async with self._sem:
            try:
                r = await (
                    client.post(path, json=payload) if payload is not None else client.get(path)
                )
            except httpx.TimeoutException as e:
                raise GenerationError(
                    "timeout", f"{type(e).__name__} after {self.options.timeout_s}s"
                ) from None
            except httpx.TransportError as e:  # refused, reset, closed mid-response
                raise GenerationError("connection", type(e).__name__) from None
        if r.status_code != 200:
            kind = _classify_status(r.status_code)
            # The server's own words (e.g. "prompt too long") are what the user can act on.
            detail = r.text[:300].replace("\n", " ") if kind == "client_error" else ""
            raise GenerationError(
                kind,
                f"HTTP {r.status_code} from {path}" + (f": {detail}" if detail else ""),
                status=r.status_code,
                retry_after=_retry_after(r.headers.get("retry-after")),
            )
        try:
            return r.json()
        except ValueError:
            raise GenerationError("malformed", f"{path} returned invalid JSON") from None

    async def _send(self, path: str, payload: dict[str, Any] | None, parse: Any) -> Any:
        """A request with retries; `parse(body)` may raise GenerationError (malformed is
        retried like a transport failure)."""
        attempt = 0
        while True:
            try:
                self.usage["requests"] += 1
                return parse(await self._send_once(path, payload))
            except GenerationError as e:
                self.errors[e.error_kind] += 1
                if e.error_kind not in RETRYABLE or attempt >= self.options.max_retries:
                    raise
                delay = min(self.options.backoff * 2**attempt, self.options.backoff_max)
                delay *= 1 + self.options.jitter * random.random()
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, max(self.options.backoff_max, 1.0)))
                attempt += 1
                self.usage["retries"] += 1
                await asyncio.sleep(delay)

    async def _model_name(self) -> str:
        if self._model is None:

            def parse(body: Any) -> str:
                data = body.get("data") if isinstance(body, dict) else None
                if not isinstance(data, list) or not data or "id" not in data[0]:
                    raise GenerationError("malformed", "GET /models listed no model")
                return str(data[0]["id"])

            self._model = await self._send("models", None, parse)
        return self._model

    def _params(
        self,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        stop: list[str] | None,
        seed: int | None,
    ) -> dict[str, Any]:
        o = self.options
        p: dict[str, Any] = {
            "temperature": o.temperature if temperature is None else temperature,
            "top_p": o.top_p if top_p is None else top_p,
            "max_tokens": o.max_tokens if max_tokens is None else max_tokens,
        }
        if stop:
            p["stop"] = list(stop)
        if seed is not None:
            p["seed"] = int(seed)
        return p

    def _account(self, usage: dict[str, int], finish: str) -> None:
        self.usage["prompt_tokens"] += usage["prompt_tokens"]
        self.usage["completion_tokens"] += usage["completion_tokens"]
        if finish == "length" and not self.options.allow_truncated:
            self.errors["truncated"] += 1
            raise GenerationError(
                "truncated", "finish_reason length (raise max_tokens, or set allow_truncated)"
            )

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
        """POST /chat/completions; the assistant message (tool_calls included) and usage."""
        payload = {
            "model": await self._model_name(),
            "messages": messages,
            **self._params(temperature, top_p, max_tokens, stop, seed),
        }
        if tools:
            payload["tools"] = tools

        def parse(body: Any) -> ChatResult:
            choice = _first_choice(body)
            msg = _check_message(choice.get("message"))
            finish = str(choice.get("finish_reason") or "stop")
            return ChatResult(msg, finish, _usage(body))

        res = await self._send("chat/completions", payload, parse)
        self._account(res.usage, res.finish_reason)
        return res

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
        """POST /completions; the continuation text and usage."""
        payload = {
            "model": await self._model_name(),
            "prompt": prompt,
            **self._params(temperature, top_p, max_tokens, stop, seed),
        }

        def parse(body: Any) -> CompleteResult:
            choice = _first_choice(body)
            text = choice.get("text")
            if not isinstance(text, str):
                raise GenerationError("malformed", "completion choice has no text")
            return CompleteResult(text, str(choice.get("finish_reason") or "stop"), _usage(body))

        res = await self._send("completions", payload, parse)
        self._account(res.usage, res.finish_reason)
        return res

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        for c in self._clients:
            try:
                await c.aclose()
            except RuntimeError:  # its loop is gone already
                pass
        self._clients = []


def build_openai(*, options: OpenAIOptions) -> OpenAIGenerator:
    """The `openai` generator factory."""
    return OpenAIGenerator(options)
