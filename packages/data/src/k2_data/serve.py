"""`k2 serve`: an OpenAI-compatible HTTP API over a k2 checkpoint (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (K2's chat format; tool calls parsed into OpenAI
`tool_calls`, finish_reason `tool_calls`; SSE streaming), POST /v1/completions (streaming
too), GET /v1/models, GET /health. Concurrent requests share engine batches (`Batcher`).
Bad requests get a 4xx JSON body `{"error": {"message", "type"}}`; nothing crashes the server.
"""


import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .chat import CALLS_BEGIN, ChatFormatError, parse_assistant, render
from .generation.batcher import Batcher
from .generation.engine import Completion, Engine, SamplingParams
from .generators.base import make_usage


class _Request(BaseModel):
    """Fields common to both completion routes (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="Model name (any; one model is served).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass.")
    max_tokens: int | None = Field(None, ge=1, description="Completion token limit.")
    stop: str | list[str] | None = Field(None, description="Stop strings (up to 4).")
    seed: int | None = Field(None, description="Seed: the same request gives the same output.")
    n: int = Field(1, ge=1, le=16, description="Completions per request.")
    stream: bool = Field(False, description="Server-sent events instead of one JSON body.")
    stream_options: dict[str, Any] | None = Field(None, description="{include_usage: bool}.")

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
    tool_choice: Any = Field(None, description="`none` hides the tools; other values: auto.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] = Field(..., description="Text, texts, or token ids.")


class ApiError(Exception):
    """A request the server refuses: HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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

    def params(self, req: _Request, max_tokens: int | None, i: int = 0, on_token: Any = None
               ) -> SamplingParams:
        """Engine sampling params of choice `i` of a request."""
        return SamplingParams(
            temperature=req.temperature, top_p=req.top_p,
            max_new_tokens=max_tokens or self.max_tokens, stop=list(req.stop or []),
            seed=None if req.seed is None else req.seed + i, on_token=on_token)

    def check_length(self, ids: list[int], max_new: int) -> None:
        """400 when prompt + completion would not fit the model's positions."""
        if not ids:
            raise ApiError(400, "the prompt is empty")
        limit = self.engine.max_positions
        if len(ids) + max_new > limit:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the "
                                f"model's context of {limit} tokens; shorten it or lower max_tokens")

    async def run(self, ids: list[int], params: SamplingParams) -> Completion:
        """One request through the batcher."""
        try:
            return await self.batcher.agenerate(ids, params)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def stream_text(self, ids: list[int], params: SamplingParams,
                          cut: str | None = None) -> AsyncIterator[str | Completion]:
        """Text deltas as tokens arrive, then the Completion; text from `cut` on is held back
        (a tool-call section), and so is a tail that may still become a stop string."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        params.on_token = lambda tok: loop.call_soon_threadsafe(q.put_nowait, tok)
        fut = asyncio.ensure_future(self.run(ids, params))
        fut.add_done_callback(lambda _: q.put_nowait(None))
        hold = max((len(s) for s in params.stop), default=0)
        tokens: list[int] = []
        sent = 0
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
        final = out.text or ""
        if cut is not None and cut in final:
            final = final[: final.index(cut)]
        if len(final) > sent:
            yield final[sent:]
        yield out

    # --- chat ----------------------------------------------------------------------------
    def chat_prompt(self, req: ChatRequest) -> list[int]:
        """Token ids of the rendered conversation with the generation prompt."""
        tools = req.tools if req.tool_choice != "none" else None
        try:
            text = render(req.messages, tools, add_generation_prompt=True)
        except ChatFormatError as exc:
            raise ApiError(400, f"messages: {exc}") from None
        return self.tokenizer.encode(text, allow_special=True)

    def chat_choice(self, out: Completion, index: int) -> dict[str, Any]:
        """One OpenAI chat choice from a Completion."""
        msg = parse_assistant(out.text or "")
        msg.pop("tool_call_errors", None)  # not an OpenAI field; the raw text stays out
        finish = out.finish_reason
        if finish == "stop" and msg.get("tool_calls"):
            finish = "tool_calls"
        return {"index": index, "message": msg, "finish_reason": finish, "logprobs": None}

    async def chat(self, req: ChatRequest) -> Any:
        """Handle POST /v1/chat/completions."""
        ids = self.chat_prompt(req)
        max_new = req.max_completion_tokens or req.max_tokens or self.max_tokens
        self.check_length(ids, max_new)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            if req.n != 1:
                raise ApiError(400, "n > 1 is not supported with stream")
            return self.chat_stream(rid, req, ids, max_new)
        outs = await asyncio.gather(*(self.run(ids, self.params(req, max_new, i))
                                      for i in range(req.n)))
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [self.chat_choice(o, i) for i, o in enumerate(outs)],
            "usage": make_usage(len(ids), sum(len(o.token_ids) for o in outs)),
        }

    async def chat_stream(self, rid: str, req: ChatRequest, ids: list[int],
                          max_new: int) -> AsyncIterator[str]:
        """SSE chunks: the role, content deltas, tool calls, the finish reason, [DONE]."""
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                              "logprobs": None}]})

        yield chunk({"role": "assistant", "content": ""})
        out: Completion | None = None
        try:
            async for piece in self.stream_text(ids, self.params(req, max_new), cut=CALLS_BEGIN):
                if isinstance(piece, Completion):
                    out = piece
                else:
                    yield chunk({"content": piece})
        except ApiError as exc:
            yield _sse(_error_body(exc.message, exc.kind))
            yield "data: [DONE]\n\n"
            return
        choice = self.chat_choice(out, 0)
        calls = choice["message"].get("tool_calls") or []
        if calls:
            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        yield chunk({}, choice["finish_reason"])
        if (req.stream_options or {}).get("include_usage"):
            yield _sse({**head, "choices": [],
                        "usage": make_usage(len(ids), len(out.token_ids))})
        yield "data: [DONE]\n\n"

    # --- completions ---------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt (a text, texts, or one list of token ids)."""
        p = req.prompt
        if isinstance(p, str):
            return [self.tokenizer.encode(p, allow_special=True)]
        if p and all(isinstance(x, int) for x in p):
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= x < vocab for x in p):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})")
            return [list(p)]
        if not p:
            raise ApiError(400, "prompt is empty")
        return [self.tokenizer.encode(t, allow_special=True) for t in p]

    async def complete(self, req: CompletionRequest) -> Any:
        """Handle POST /v1/completions."""
        prompts = self.completion_prompts(req)
        max_new = req.max_tokens or 16
        for ids in prompts:
            self.check_length(ids, max_new)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            if req.n != 1 or len(prompts) != 1:
                raise ApiError(400, "stream supports one prompt and n = 1")
            return self.complete_stream(rid, req, prompts[0], max_new)
        jobs = [(ids, self.params(req, max_new, i)) for ids in prompts for i in range(req.n)]
        outs = await asyncio.gather(*(self.run(ids, sp) for ids, sp in jobs))
        return {
            "id": rid, "object": "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": i, "text": o.text or "", "finish_reason": o.finish_reason,
                         "logprobs": None} for i, o in enumerate(outs)],
            "usage": make_usage(sum(len(ids) for ids, _ in jobs),
                                sum(len(o.token_ids) for o in outs)),
        }

    async def complete_stream(self, rid: str, req: CompletionRequest, ids: list[int],
                              max_new: int) -> AsyncIterator[str]:
        """SSE chunks of text, then the finish reason and [DONE]."""
        head = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        out: Completion | None = None
        try:
            async for piece in self.stream_text(ids, self.params(req, max_new)):
                if isinstance(piece, Completion):
                    out = piece
                else:
                    yield _sse({**head, "choices": [{"index": 0, "text": piece,
                                                     "finish_reason": None, "logprobs": None}]})
        except ApiError as exc:
            yield _sse(_error_body(exc.message, exc.kind))
            yield "data: [DONE]\n\n"
            return
        yield _sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                         "finish_reason": out.finish_reason}]})
        if (req.stream_options or {}).get("include_usage"):
            yield _sse({**head, "choices": [], "usage": make_usage(len(ids), len(out.token_ids))})
        yield "data: [DONE]\n\n"


def create_app(engine: Engine, model_name: str = "k2", *, max_tokens: int = 512) -> Any:
    """The FastAPI app serving `engine` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = Server(engine, model_name, max_tokens)
    app = FastAPI(title="k2 serve")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.kind), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid")
        return JSONResponse(_error_body(msg, "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}",
                                        "server_error"), status_code=500)

    async def _body(request: Request, model: type[BaseModel]) -> Any:
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ApiError(400, f"{where}: {err['msg']}") from None

    def _respond(result: Any) -> Any:
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "weights_version": engine.version,
                "batches": server.batcher.batches, "requests": server.batcher.requests}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": server.created, "owned_by": "k2"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return _respond(await server.chat(await _body(request, ChatRequest)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return _respond(await server.complete(await _body(request, CompletionRequest)))

    return app


class ServeOptions(BaseModel):
    """How `k2 serve` runs (also its command-line flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    uri: str = Field(..., description="Saved model or training checkpoint to serve.")
    host: str = Field("127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; None: the checkpoint's.")
    model_name: str | None = Field(None, description="Name in /v1/models; None: the URI's last part.")
    max_batch_size: int = Field(64, gt=0, description="Requests decoded together at most.")
    max_tokens: int = Field(512, gt=0, description="Default completion limit for chat requests.")


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
        raise ConfigError(f"serve: cannot listen on {options.host}:{options.port} ({exc.strerror}); "
                          "pick another --port or --host") from None
    engine = Engine.from_checkpoint(options.uri, options.tokenizer,
                                    max_batch_size=options.max_batch_size)
    name = options.model_name or options.uri.rstrip("/").rsplit("/", 1)[-1] or "k2"
    app = create_app(engine, name, max_tokens=options.max_tokens)
    print(f"k2 serve: {options.uri} as {name!r} on http://{options.host}:{options.port}/v1",
          flush=True)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    finally:
        app.state.server.batcher.close()


def serve_command(*, options: Any = None) -> Any:
    """Serve a k2 checkpoint over an OpenAI-compatible HTTP API (k2 serve URI)."""
    from k2_core.cli import Command

    def add(p: Any) -> None:
        p.add_argument("uri", help="saved model or training checkpoint (any fsspec URI)")
        p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
        p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
        p.add_argument("--model-name", default=None, help="name in /v1/models")
        p.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together")
        p.add_argument("--max-tokens", type=int, default=512, help="default completion limit")

    def run(args: Any) -> int:
        from k2_core.errors import ConfigError

        try:
            opts = ServeOptions(uri=args.uri, host=args.host, port=args.port,
                                tokenizer=args.tokenizer, model_name=args.model_name,
                                max_batch_size=args.max_batch_size, max_tokens=args.max_tokens)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"serve: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        serve(opts)
        return 0

    return Command("serve", serve_command.__doc__ or "", add, run)
