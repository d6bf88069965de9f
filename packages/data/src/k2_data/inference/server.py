"""`k2 serve`: an OpenAI-compatible HTTP API over a k2 checkpoint (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (K2's chat format; tool calls parsed into OpenAI
`tool_calls`, finish_reason `tool_calls`; SSE streaming), POST /v1/completions (streaming
too), GET /v1/models, GET /health, POST /update_weights_from_disk (a new weights version from
a checkpoint under a --weights-root, with the API key; weights.py). Completion responses
carry `weights_version`, the version of the weights that generated them. Concurrent requests
share engine batches (`Batcher`).
Bad requests get a 4xx JSON body `{"error": {"message", "type", "code"}}`; nothing crashes
the server. Hardening (README, "Serving under abuse"): chat content is encoded as text
(control tokens only from the envelope), bodies over a limit get 413 unread, parsing and
tokenising run off the event loop, a client that goes away cancels its generation, a bounded
queue answers 429, an optional API key guards every route but /health.
"""

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..chat import (
    CALL_ARGS,
    CALL_BEGIN,
    CALLS_BEGIN,
    ChatFormatError,
    Part,
    chat_parts,
    encode_parts_batch,
    parse_assistant,
)
from ..generators.base import make_usage
from .batcher import Batcher
from .command import API_KEY_ENV
from .engine import Completion, Engine, SamplingParams
from .weights import UpdateWeightsRequest, WeightLoader

MAX_TOP_LOGPROBS = 20  # as vLLM and OpenAI chat
# Bodies up to this size are parsed and tokenised on the event loop, larger ones in a thread.
# Nesting is no risk inline: the JSON parser stops at its recursion limit (~1000 levels),
# which takes microseconds.
INLINE_BODY_BYTES = 16 * 1024


class _Request(BaseModel):
    """Fields common to both completion routes (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="Model name: the served one (or none).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass.")
    max_tokens: int | None = Field(None, ge=1, description="Completion token limit.")
    stop: str | list[str] | None = Field(None, description="Stop strings (up to 4).")
    seed: int | None = Field(None, description="Seed: the same request gives the same output.")
    n: int = Field(1, ge=1, le=16, description="Completions per request.")
    stream: bool = Field(False, description="Server-sent events instead of one JSON body.")
    stream_options: dict[str, Any] | None = Field(None, description="{include_usage: bool}.")
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM's extension: logprobs tokens as 'token_id:ID'."
    )
    ignore_eos: bool = Field(False, description="vLLM's extension: run to max_tokens.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(..., min_length=1, description="The conversation.")
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI-style tool specs.")
    tool_choice: Any = Field(
        None, description="none, auto, required or {type: function, function: {name}}."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Raw log-probabilities of the generated tokens.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token (needs logprobs)."
    )


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] = Field(..., description="Text, texts, or token ids.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Raw logprobs plus this many alternatives per token.",
    )


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, OpenAI error type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers


def _error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The validated request from raw JSON bytes; ApiError 400 on anything malformed."""
    try:
        data = json.loads(raw)
    except RecursionError:  # JSON nested thousands deep: the parser's recursion gives up
        raise ApiError(400, "the request body nests too deeply") from None
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}") from None


class _Forced:
    """What `tool_choice` makes the server put after the generation prompt, and its text."""

    def __init__(self, parts: list[Part], required: bool):
        self.parts, self.required = parts, required
        self.text = "".join(t for t, _ in parts)


class Server:
    """The routes' logic over one engine and its batcher."""

    def __init__(self, engine: Engine, model_name: str, max_tokens: int = 512):
        if engine.tokenizer is None:
            raise ValueError("k2 serve needs an engine with a tokenizer")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_tokens = max_tokens
        self.batcher = Batcher(engine)
        self.created = int(time.time())
        self.stop_ids = set(engine.default_stop_ids)
        self.tool_call_errors = 0  # malformed tool calls the model emitted (in /health)
        # The longest any one token decodes to, in UTF-8 bytes: text of more than
        # max_positions times this many bytes cannot fit the context whatever its tokens, so
        # it is refused without spending seconds tokenising it.
        special = set(self.tokenizer.special_tokens.values())
        ids = [i for i in range(self.tokenizer.vocab_size) if i not in special]
        texts = self.tokenizer.decode_batch([[i] for i in ids])
        self.max_token_bytes = max([len(t.encode()) for t in texts] or [1])
        self.max_special_bytes = max(
            [len(t.encode()) for t in self.tokenizer.special_tokens] or [1]
        )

    def check_model(self, req: _Request) -> None:
        """404 for a model name other than the served one (as the OpenAI API answers)."""
        if req.model is not None and req.model != self.model_name:
            raise ApiError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                code="model_not_found",
                param="model",
            )

    def params(
        self,
        req: _Request,
        max_tokens: int | None,
        i: int = 0,
        on_token: Any = None,
        cancel: threading.Event | None = None,
        top_logprobs: int = 0,
    ) -> SamplingParams:
        """Engine sampling params of choice `i` of a request."""
        return SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            max_new_tokens=max_tokens or self.max_tokens,
            stop=list(req.stop or []),
            seed=None if req.seed is None else req.seed + i,
            on_token=on_token,
            top_logprobs=top_logprobs,
            cancel=cancel,
            ignore_eos=req.ignore_eos,
        )

    def check_text_size(self, n_bytes: int, per_token: int) -> None:
        """400 before tokenising when `n_bytes` of text cannot fit the context at all."""
        if n_bytes > self.engine.max_positions * per_token:
            raise ApiError(
                400,
                f"the prompt ({n_bytes} bytes) exceeds the model's context of "
                f"{self.engine.max_positions} tokens",
                code="context_length_exceeded",
            )

    def check_length(self, ids: list[int], max_new: int) -> None:
        """400 when prompt + completion would not fit the model's positions."""
        if not ids:
            raise ApiError(400, "the prompt is empty")
        limit = self.engine.max_positions
        if len(ids) + max_new > limit:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the "
                f"model's context of {limit} tokens; shorten it or lower max_tokens",
                code="context_length_exceeded",
            )

    async def run(self, ids: list[int], params: SamplingParams) -> Completion:
        """One request through the batcher; cancelling the await cancels the generation."""
        fut = self.batcher.submit(ids, params)
        try:
            return await asyncio.wrap_future(fut)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            if not fut.done() and params.cancel is not None:
                params.cancel.set()  # running already: the engine drops the row next step

    async def stream_text(
        self, ids: list[int], params: SamplingParams, cut: str | None = None
    ) -> AsyncIterator[str | Completion]:
        """Text deltas as tokens arrive, then the Completion; text from `cut` on is held back
        (a tool-call section), and so is a tail that may still become a stop string. Closing
        the iterator early (the client went away) cancels the generation."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        params.cancel = params.cancel or threading.Event()
        params.on_token = lambda tok: loop.call_soon_threadsafe(q.put_nowait, tok)
        fut = asyncio.ensure_future(self.run(ids, params))
        fut.add_done_callback(lambda _: q.put_nowait(None))
        hold = max((len(s) for s in params.stop), default=0)
        tokens: list[int] = []
        sent = 0
        try:
            while True:
                tok = await q.get()
                if tok is None:
                    break
                if tok in self.stop_ids:
                    continue
                tokens.append(tok)
                text = self.tokenizer.decode(tokens)
                end = len(text) - hold
                if cut is not None and cut in text:
                    end = min(end, text.index(cut))
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                    end = min(end, len(text) - 1)
                if end > sent:
                    yield text[sent:end]
                    sent = end
            out = await fut
        finally:
            if not fut.done():
                params.cancel.set()
                fut.cancel()
        final = out.text or ""
        if cut is not None and cut in final:
            final = final[: final.index(cut)]
        if len(final) > sent:
            yield final[sent:]
        yield out

    # --- logprobs ------------------------------------------------------------------------
    def _token_text(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tokenizer.decode([tid])

    def chat_logprobs(self, out: Completion, as_ids: bool) -> dict[str, Any]:
        """OpenAI chat `logprobs`: every generated token (the stop token included) with its
        raw log-probability and alternatives."""

        def entry(tid: int, lp: float) -> dict[str, Any]:
            tok = self._token_text(tid, as_ids)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        tops = out.top_logprobs or [[] for _ in out.token_ids]
        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                for t, lp, top in zip(out.token_ids, out.logprobs, tops, strict=True)
            ],
            "refusal": None,
        }

    def completion_logprobs(self, out: Completion, as_ids: bool) -> dict[str, Any]:
        """OpenAI (legacy) completions `logprobs`: tokens, token_logprobs, top_logprobs,
        text_offset, one entry per generated token."""
        toks = [self._token_text(t, as_ids) for t in out.token_ids]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        tops = None
        if out.top_logprobs is not None:
            tops = [{self._token_text(a, as_ids): b for a, b in top} for top in out.top_logprobs]
        return {
            "tokens": toks,
            "token_logprobs": list(out.logprobs),
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    # --- chat ----------------------------------------------------------------------------
    def forced(self, req: ChatRequest) -> _Forced | None:
        """The tool-call envelope `tool_choice` forces the answer to start with, if any."""
        choice = req.tool_choice
        if choice in (None, "auto", "none"):
            return None
        names = [
            str((t.get("function") or {}).get("name"))
            for t in req.tools or []
            if isinstance(t, dict)
        ]
        if choice == "required":
            if not names:
                raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
            return _Forced([(CALLS_BEGIN, True)], required=True)
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or choice.get("type") != "function":
            raise ApiError(
                400,
                "tool_choice: none, auto, required or {type: function, function: {name}}",
                param="tool_choice",
            )
        if name not in names:
            raise ApiError(
                400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice"
            )
        return _Forced(
            [
                (CALLS_BEGIN, True),
                (CALL_BEGIN, True),
                (f"functions.{name}:0", False),
                (CALL_ARGS, True),
            ],
            required=True,
        )

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], _Forced | None]:
        """Token ids of the conversation with the generation prompt (and what tool_choice
        forces after it): control tokens from the structure, content always as text."""
        tools = req.tools if req.tool_choice != "none" else None
        forced = self.forced(req)
        try:
            parts = [
                p
                for seg, _ in chat_parts(req.messages, tools, add_generation_prompt=True)
                for p in seg
            ]
        except ChatFormatError as exc:
            raise ApiError(400, f"messages: {exc}") from None
        if forced is not None:
            parts += forced.parts
        self.check_text_size(
            sum(len(t.encode()) for t, ctl in parts if not ctl), self.max_token_bytes
        )
        try:
            return encode_parts_batch(self.tokenizer, [parts])[0], forced
        except ChatFormatError as exc:
            raise ApiError(400, f"messages: {exc}") from None

    def chat_choice(
        self,
        out: Completion,
        index: int,
        forced: _Forced | None = None,
        logprobs: bool = False,
        as_ids: bool = False,
    ) -> dict[str, Any]:
        """One OpenAI chat choice from a Completion.

        Malformed tool calls are not dropped: as vLLM does when its tool parser fails, the
        model's whole raw output becomes the content (no tool_calls), the errors are listed
        under the choice's `tool_call_errors` and counted in /health.
        """
        raw = (forced.text if forced else "") + (out.text or "")
        msg = parse_assistant(raw)
        errors = [e["error"] for e in msg.pop("tool_call_errors", [])]
        if forced is not None and forced.required and not msg.get("tool_calls") and not errors:
            errors.append("tool_choice demands a tool call and the model made none")
        finish = out.finish_reason
        if errors:
            self.tool_call_errors += len(errors)
            msg = {"role": "assistant", "content": raw}
        elif finish == "stop" and msg.get("tool_calls"):
            finish = "tool_calls"
        choice = {
            "index": index,
            "message": msg,
            "finish_reason": finish,
            "logprobs": self.chat_logprobs(out, as_ids) if logprobs else None,
        }
        if errors:
            choice["tool_call_errors"] = errors
        return choice

    def chat_max_new(self, req: ChatRequest) -> int:
        """The completion budget of a chat request."""
        return req.max_completion_tokens or req.max_tokens or self.max_tokens

    def prepare_chat(self, req: ChatRequest) -> tuple[list[int], _Forced | None]:
        """Everything before generation that may be slow (render, tokenise, checks); run it
        off the event loop."""
        self.check_model(req)
        if req.stream and req.n != 1:
            raise ApiError(400, "n > 1 is not supported with stream")
        ids, forced = self.chat_prompt(req)
        self.check_length(ids, self.chat_max_new(req))
        return ids, forced

    async def chat(
        self,
        req: ChatRequest,
        ids: list[int],
        forced: _Forced | None,
        cancel: threading.Event | None = None,
    ) -> Any:
        """Handle POST /v1/chat/completions (after `prepare_chat`)."""
        max_new = self.chat_max_new(req)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        top = (req.top_logprobs or 0) if req.logprobs else 0
        if req.stream:
            return self.chat_stream(rid, req, ids, max_new, forced, top)
        outs = await asyncio.gather(
            *(
                self.run(ids, self.params(req, max_new, i, cancel=cancel, top_logprobs=top))
                for i in range(req.n)
            )
        )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                self.chat_choice(o, i, forced, req.logprobs, req.return_tokens_as_token_ids)
                for i, o in enumerate(outs)
            ],
            "weights_version": min(o.version for o in outs),
            "usage": make_usage(len(ids), sum(len(o.token_ids) for o in outs)),
        }

    async def chat_stream(
        self,
        rid: str,
        req: ChatRequest,
        ids: list[int],
        max_new: int,
        forced: _Forced | None,
        top: int,
    ) -> AsyncIterator[str]:
        """SSE chunks: the role, content deltas, tool calls, the finish reason (with the
        logprobs of every token when asked), [DONE]."""
        head = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
        }

        def chunk(
            delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, **extra: Any
        ) -> str:
            return _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "finish_reason": finish,
                            "logprobs": logprobs,
                            **extra,
                        }
                    ],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        out: Completion | None = None
        sent = ""
        # a forced tool call holds everything back: it is parsed whole at the end
        cut = "" if forced is not None else CALLS_BEGIN
        try:
            async for piece in self.stream_text(
                ids, self.params(req, max_new, top_logprobs=top), cut=cut
            ):
                if isinstance(piece, Completion):
                    out = piece
                else:
                    sent += piece
                    yield chunk({"content": piece})
        except ApiError as exc:
            yield _sse(_error_body(exc.message, exc.kind, exc.code))
            yield "data: [DONE]\n\n"
            return
        choice = self.chat_choice(out, 0, forced)
        content = choice["message"].get("content") or ""
        if content.startswith(sent) and len(content) > len(sent):
            yield chunk({"content": content[len(sent) :]})  # malformed tool calls, as text
        calls = choice["message"].get("tool_calls") or []
        if calls:
            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        lp = self.chat_logprobs(out, req.return_tokens_as_token_ids) if req.logprobs else None
        errors = (
            {"tool_call_errors": choice["tool_call_errors"]} if "tool_call_errors" in choice else {}
        )
        yield chunk({}, choice["finish_reason"], lp, **errors)
        if (req.stream_options or {}).get("include_usage"):
            yield _sse({**head, "choices": [], "usage": make_usage(len(ids), len(out.token_ids))})
        yield "data: [DONE]\n\n"

    # --- completions ---------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt (a text, texts, or one list of token ids). A completion
        prompt is raw model input, written whole by the caller: special-token strings in it
        are K2's control tokens, as in vLLM."""
        p = req.prompt
        if p and all(isinstance(x, int) for x in p):
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= x < vocab for x in p):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})")
            return [list(p)]
        texts = [p] if isinstance(p, str) else list(p)
        if not texts:
            raise ApiError(400, "prompt is empty")
        per_token = max(self.max_token_bytes, self.max_special_bytes)
        for t in texts:
            self.check_text_size(len(t.encode()), per_token)
        return self.tokenizer.encode_batch(texts, allow_special=True)

    def prepare_complete(self, req: CompletionRequest) -> list[list[int]]:
        """Checks and tokenising before generation; run it off the event loop."""
        self.check_model(req)
        prompts = self.completion_prompts(req)
        for ids in prompts:
            self.check_length(ids, req.max_tokens or 16)
        if req.stream and (req.n != 1 or len(prompts) != 1):
            raise ApiError(400, "stream supports one prompt and n = 1")
        return prompts

    async def complete(
        self,
        req: CompletionRequest,
        prompts: list[list[int]],
        cancel: threading.Event | None = None,
    ) -> Any:
        """Handle POST /v1/completions (after `prepare_complete`)."""
        max_new = req.max_tokens or 16
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        top = req.logprobs or 0
        if req.stream:
            return self.complete_stream(rid, req, prompts[0], max_new, top)
        jobs = [
            (ids, self.params(req, max_new, i, cancel=cancel, top_logprobs=top))
            for ids in prompts
            for i in range(req.n)
        ]
        outs = await asyncio.gather(*(self.run(ids, sp) for ids, sp in jobs))
        as_ids = req.return_tokens_as_token_ids
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": i,
                    "text": o.text or "",
                    "finish_reason": o.finish_reason,
                    "logprobs": (
                        self.completion_logprobs(o, as_ids) if req.logprobs is not None else None
                    ),
                    "weights_version": o.version,
                }
                for i, o in enumerate(outs)
            ],
            "weights_version": min(o.version for o in outs),
            "usage": make_usage(
                sum(len(ids) for ids, _ in jobs), sum(len(o.token_ids) for o in outs)
            ),
        }

    async def complete_stream(
        self, rid: str, req: CompletionRequest, ids: list[int], max_new: int, top: int
    ) -> AsyncIterator[str]:
        """SSE chunks of text, then the finish reason (with the logprobs of every token when
        asked) and [DONE]."""
        head = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        out: Completion | None = None
        try:
            async for piece in self.stream_text(ids, self.params(req, max_new, top_logprobs=top)):
                if isinstance(piece, Completion):
                    out = piece
                else:
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
                            ],
                        }
                    )
        except ApiError as exc:
            yield _sse(_error_body(exc.message, exc.kind, exc.code))
            yield "data: [DONE]\n\n"
            return
        lp = (
            self.completion_logprobs(out, req.return_tokens_as_token_ids)
            if req.logprobs is not None
            else None
        )
        yield _sse(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "text": "",
                        "logprobs": lp,
                        "finish_reason": out.finish_reason,
                        "weights_version": out.version,
                    }
                ],
            }
        )
        if (req.stream_options or {}).get("include_usage"):
            yield _sse({**head, "choices": [], "usage": make_usage(len(ids), len(out.token_ids))})
        yield "data: [DONE]\n\n"


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware run before routing: the API key (every route but /health) and the
    declared body size (413 from the Content-Length header alone, nothing read)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = (
            auth[7:].strip()
            if auth[:7].lower() == "bearer "
            else headers.get(b"x-api-key", b"").decode("latin-1")
        )
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health" and not self._authorized(headers):
            resp = _json_response(
                401,
                _error_body(
                    "Incorrect or missing API key: send Authorization: Bearer <key>",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                {"WWW-Authenticate": "Bearer"},
            )
            return await resp(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _too_large(self.max_body_bytes)(scope, receive, send)
        return await self.app(scope, receive, send)


def _too_large(limit: int) -> Any:
    return _json_response(
        413,
        _error_body(
            f"the request body exceeds the server's limit of {limit} bytes (--max-body-mb)",
            "invalid_request_error",
            "request_too_large",
        ),
        {"Connection": "close"},
    )


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, refused with 413 as soon as it grows past `limit` (chunked uploads); a client
    that hangs up before its body is complete gets an answer nobody reads, not a traceback."""
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    f"the request body exceeds the server's limit of {limit} bytes (--max-body-mb)",
                    code="request_too_large",
                    headers={"Connection": "close"},
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(
            400,
            "the client closed the connection before its request body arrived",
            code="client_disconnected",
            headers={"Connection": "close"},
        ) from None
    return b"".join(chunks)


async def _until_disconnect(
    receive: Callable[[], Awaitable[dict[str, Any]]], cancel: threading.Event
) -> None:
    """Set `cancel` when the client goes away (the body is read: the next message is the
    disconnect)."""
    while True:
        if (await receive())["type"] == "http.disconnect":
            cancel.set()
            return


def create_app(
    engine: Engine,
    model_name: str = "k2",
    *,
    max_tokens: int = 512,
    max_body_mb: float = 16.0,
    api_key: str | None = None,
    max_queue: int = 256,
    weights_roots: tuple[str, ...] = (),
) -> Any:
    """The FastAPI app serving `engine` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = Server(engine, model_name, max_tokens)
    max_body = int(max_body_mb * 1024 * 1024)
    app = FastAPI(title="k2 serve")
    app.state.server = server
    app.state.pending = 0  # requests admitted and not finished (streams included)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Any:
        return _json_response(
            exc.status, _error_body(exc.message, exc.kind, exc.code, exc.param), exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid")
        )
        return _json_response(400, _error_body(msg, "invalid_request_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Any:
        return _json_response(
            exc.status_code, _error_body(str(exc.detail), "invalid_request_error")
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Any:
        if isinstance(exc, RecursionError):
            return _json_response(
                400, _error_body("the request nests too deeply", "invalid_request_error")
            )
        return _json_response(
            500, _error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
        )

    async def _handle(
        request: Request,
        model: type[BaseModel],
        prepare: Callable[[Any], Any],
        go: Callable[[Any, Any, threading.Event], Awaitable[Any]],
    ) -> Any:
        """Admit (429 when the queue is full), read (413), parse and tokenise off the loop,
        generate; the client going away cancels the generation."""
        if app.state.pending >= max_queue:
            raise ApiError(
                429,
                f"the server has {max_queue} requests in flight (--max-queue); retry later",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        app.state.pending += 1
        streaming = False
        try:
            raw = await _read_body(request, max_body)
            if len(raw) <= INLINE_BODY_BYTES:
                # a small body parses and tokenises in well under a millisecond: a round trip
                # through a worker thread would cost more (GIL hand-offs under load)
                req = parse_body(raw, model)
                prepared = prepare(req)
            else:
                req = await asyncio.to_thread(parse_body, raw, model)
                prepared = await asyncio.to_thread(prepare, req)
            cancel = threading.Event()
            watch = (
                None
                if getattr(req, "stream", False)
                else asyncio.ensure_future(_until_disconnect(request.receive, cancel))
            )
            try:
                result = await go(req, prepared, cancel)
            finally:
                if watch is not None:
                    watch.cancel()
            if isinstance(result, dict):
                return result
            streaming = True
            return StreamingResponse(
                _release(result),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        finally:
            if not streaming:
                app.state.pending -= 1

    async def _release(stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """The stream, leaving the queue count when it ends or its client goes away."""
        try:
            async for piece in stream:
                yield piece
        finally:
            app.state.pending -= 1
            await stream.aclose()  # runs the inner finally now: cancels the generation

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = server.batcher
        return {
            "status": "ok",
            "model": model_name,
            "weights_version": engine.version,
            "batches": b.batches,
            "requests": b.requests,
            "cancelled": b.cancelled,
            "pending": app.state.pending,
            "tool_call_errors": server.tool_call_errors,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": server.created, "owned_by": "k2"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _handle(
            request,
            ChatRequest,
            server.prepare_chat,
            lambda req, prep, cancel: server.chat(req, *prep, cancel=cancel),
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _handle(
            request,
            CompletionRequest,
            server.prepare_complete,
            lambda req, prep, cancel: server.complete(req, prep, cancel=cancel),
        )

    loader = WeightLoader(engine, weights_roots, has_api_key=bool(api_key))

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request) -> Any:
        req = parse_body(await _read_body(request, max_body), UpdateWeightsRequest)
        refusal = loader.refusal(req.model_path)
        if refusal is not None:
            raise ApiError(
                403, refusal, kind="permission_error", code="weights_root", param="model_path"
            )
        try:
            return await asyncio.to_thread(loader.load, req.model_path, req.version)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="model_path") from None

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body)
    return app


class ServeOptions(BaseModel):
    """How `k2 serve` runs (also its command-line flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    uri: str = Field(..., description="Saved model or training checkpoint to serve.")
    host: str = Field("127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; None: the checkpoint's.")
    model_name: str | None = Field(
        None, description="Name in /v1/models; None: the URI's last part."
    )
    max_batch_size: int = Field(64, gt=0, description="Requests decoded together at most.")
    max_tokens: int = Field(512, gt=0, description="Default completion limit for chat requests.")
    max_body_mb: float = Field(16.0, gt=0, description="Request bodies over this many MiB get 413.")
    api_key: str | None = Field(
        None,
        repr=False,  # never printed with the options
        description=f"Required bearer key on every route but /health; "
        f"None: ${API_KEY_ENV} or no key.",
    )
    max_queue: int = Field(256, gt=0, description="Requests in flight at most; more get 429.")
    weights_roots: tuple[str, ...] = Field(
        (),
        description="Folders (URIs) whose checkpoints POST /update_weights_from_disk may "
        "load (needs api_key too); empty: weight updates are refused.",
    )
    push_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also receive weights by the bucketed push "
        "(k2_core.weight_push) on this port, authenticated by api_key; None: no push listener.",
    )
    push_host: str = Field("127.0.0.1", description="Address of the push listener.")


def serve(options: ServeOptions) -> None:
    """Load the checkpoint and serve it until interrupted."""
    import socket

    import uvicorn
    from k2_core.errors import ConfigError

    # a taken port is a user error: say so before spending time on loading the model
    try:
        with socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((options.host, options.port))
    except OSError as exc:
        raise ConfigError(
            f"serve: cannot listen on {options.host}:{options.port} ({exc.strerror}); "
            "pick another --port or --host"
        ) from None
    if options.push_port is not None and not options.api_key:
        raise ConfigError(
            "serve: --push-port: the push is authenticated by the server's API "
            f"key; set --api-key or ${API_KEY_ENV}"
        )
    engine = Engine.from_checkpoint(
        options.uri, options.tokenizer, max_batch_size=options.max_batch_size
    )
    receiver = None
    if options.push_port is not None:
        from k2_core.weight_push import WeightReceiver

        try:
            receiver = WeightReceiver(
                engine, options.push_host, options.push_port, token=options.api_key
            )
        except OSError as exc:
            raise ConfigError(
                f"serve: --push-port: cannot listen on {options.push_host}:"
                f"{options.push_port} ({exc.strerror}); pick another"
            ) from None
    name = options.model_name or options.uri.rstrip("/").rsplit("/", 1)[-1] or "k2"
    app = create_app(
        engine,
        name,
        max_tokens=options.max_tokens,
        max_body_mb=options.max_body_mb,
        api_key=options.api_key,
        max_queue=options.max_queue,
        weights_roots=options.weights_roots,
    )
    print(
        f"k2 serve: {options.uri} as {name!r} on http://{options.host}:{options.port}/v1"
        + (f"; weight push on {receiver.address[0]}:{receiver.address[1]}" if receiver else ""),
        flush=True,
    )
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    finally:
        if receiver is not None:
            receiver.close()
        app.state.server.batcher.close()
