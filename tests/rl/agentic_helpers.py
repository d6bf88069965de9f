"""Shared by the agentic evaluation tests: a real `k2 serve` of the tiny chat checkpoint
(tests/data/serve_fixture.py: it has memorised a get_weather call for "What is the weather in
Paris?" and "Hello there, friend!" for "Say hello."), a scripted OpenAI-compatible endpoint
on a real local HTTP server, and a runner of the `k2` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from serve_fixture import (  # noqa: E402
    ASK_HELLO,
    ASK_TOOL,
    K2,
    TOOLS,
    make_checkpoint,
    start_server,
    stop_server,
)

__all__ = [
    "ASK_HELLO",
    "ASK_TOOL",
    "K2",
    "TOOLS",
    "Scripted",
    "run_k2",
    "serve_tiny",
    "stop_server",
    "weather_suite",
]


def tiny_checkpoint(tmp_path_factory: Any) -> str:
    """The tiny chat checkpoint, trained once per test session: xdist workers share the
    session's base folder, and a file lock makes the others wait for the first (training
    takes 8 s on a quiet box, a minute on a loaded one)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # an xdist worker: its parent is the session's
        root = root.parent
    path = root / "agentic-tiny-chat"
    with open(root / "agentic-tiny-chat.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "done").exists():
            make_checkpoint(str(path))
            (path / "done").write_text("ok")
    return str(path)


def serve_tiny(tmp_path_factory: Any, *args: str) -> tuple[subprocess.Popen, str]:
    """`k2 serve` of the tiny chat checkpoint as model `tiny`, 48 tokens per answer."""
    return start_server(
        tiny_checkpoint(tmp_path_factory), "--model-name", "tiny", "--max-tokens", "48", *args
    )


def weather_suite(path: Path, repeat: int = 1) -> Path:
    """A JSONL suite around what the tiny model knows: the Paris weather call under each
    tool_choice, and the greeting with and without tools."""
    call = {
        "call": "must",
        "tools": ["get_weather"],
        "min_calls": 1,
        "args": {"get_weather": {"city": "Paris"}},
    }
    named = {"type": "function", "function": {"name": "get_weather"}}
    base = [
        ("auto", ASK_TOOL, TOOLS, None, call),
        ("required", ASK_TOOL, TOOLS, "required", call),
        ("named", ASK_TOOL, TOOLS, named, call),
        ("none", ASK_TOOL, TOOLS, "none", {"call": "must_not"}),
        ("hello_tools", ASK_HELLO, TOOLS, None, {"call": "must_not"}),
        ("hello", ASK_HELLO, [], None, {"call": "must_not"}),
    ]
    with path.open("w") as f:
        for r in range(repeat):
            for kind, msgs, tools, choice, exp in base:
                case = {
                    "id": f"{kind}-{r}",
                    "kind": kind,
                    "features": [kind],
                    "messages": msgs,
                    "tools": tools,
                    "expect": exp,
                }
                if choice is not None:
                    case["tool_choice"] = choice
                f.write(json.dumps(case) + "\n")
    return path


class Scripted:
    """An OpenAI-compatible endpoint on a real local HTTP server whose chat answers come from
    `reply(body) -> dict` (an OpenAI chat completion body, or {"__stream__": [chunks]} /
    {"__raw__": (status, text)} for anything else)."""

    def __init__(self, reply: Callable[[dict[str, Any]], dict[str, Any]], model: str = "fake"):
        from pytest_httpserver import HTTPServer
        from werkzeug import Request, Response

        self.reply, self.model = reply, model
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)

        def handle(request: Request) -> Response:
            if request.path.endswith("/models"):
                return Response(
                    json.dumps({"object": "list", "data": [{"id": model}]}),
                    content_type="application/json",
                )
            body = request.get_json(force=True, silent=True) or {}
            with self.lock:
                self.requests.append(body)
            out = self.reply(body)
            if "__raw__" in out:
                status, text = out["__raw__"]
                return Response(text, status=status, content_type="application/json")
            if body.get("stream"):
                chunks = out.get("__stream__") or _as_chunks(out)
                text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                return Response(text, content_type="text/event-stream")
            return Response(json.dumps(out), content_type="application/json")

        self.server.expect_request("/v1/models").respond_with_handler(handle)
        self.server.expect_request("/v1/chat/completions").respond_with_handler(handle)
        self.server.start()
        self.base_url = f"http://127.0.0.1:{self.server.port}/v1"

    def stop(self) -> None:
        """Stop the server."""
        self.server.clear()
        if self.server.is_running():
            self.server.stop()


def chat_body(
    content: str | None, calls: list[tuple[str, str]] | None = None, finish: str = "stop"
) -> dict[str, Any]:
    """A chat completion body with `content` and tool calls given as (name, arguments)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _as_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream of a chat body: role, content in two pieces, each call split mid-arguments."""
    ch = body["choices"][0]
    msg = ch["message"]
    out = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    text = msg.get("content") or ""
    for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
        if piece:
            out.append({"choices": [{"index": 0, "delta": {"content": piece}}]})
    for i, c in enumerate(msg.get("tool_calls") or []):
        a = c["function"]["arguments"]
        out.append(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": i,
                                    "id": c["id"],
                                    "type": "function",
                                    "function": {
                                        "name": c["function"]["name"],
                                        "arguments": a[: len(a) // 2],
                                    },
                                }
                            ]
                        },
                    }
                ]
            }
        )
        out.append(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {"index": i, "function": {"arguments": a[len(a) // 2 :]}}
                            ]
                        },
                    }
                ]
            }
        )
    out.append(
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": ch["finish_reason"]}],
            "usage": body.get("usage"),
        }
    )
    return out


def run_k2(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`k2 *args` as a user runs it; stdout and stderr captured as text."""
    import os

    return subprocess.run(
        [K2, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def train_chat_checkpoint(
    path: str,
    conversations: list[tuple[list[dict], list[dict] | None]],
    *,
    max_positions: int = 2048,
    vocab_size: int = 2000,
    steps: int = 300,
    batch: int = 8,
) -> None:
    """A tiny MLA checkpoint (and BPE tokenizer) that memorises `conversations` (messages,
    tools): the model behind the example reports of docs/agentic-eval.md."""
    import torch
    from k2_core.config import ModelConfig, MoEConfig
    from k2_core.model import build_model
    from k2_core.modelio import save_model
    from k2_data.chat import encode_chat, render
    from k2_data.tokenizer import BpeTokenizer

    tok = BpeTokenizer.train(
        [render(m, t) for m, t in conversations], vocab_size=vocab_size, min_frequency=1
    )
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
    )
    model = build_model((cfg, MoEConfig()))
    rows = [encode_chat(tok, m, t) for m, t in conversations]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randperm(len(rows), generator=g)[:batch].tolist()
        width = max(len(rows[i][0]) for i in pick)
        ids = torch.zeros(len(pick), width, dtype=torch.long)
        labels = torch.full((len(pick), width), -100, dtype=torch.long)
        for j, i in enumerate(pick):
            r, mask = rows[i]
            ids[j, : len(r)] = torch.tensor(r)
            for t in range(1, len(r)):
                if mask[t]:
                    labels[j, t - 1] = r[t]
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    save_model(model, path)
    tok.save(f"{path}/tokenizer")
