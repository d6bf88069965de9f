"""`k2 serve` as a real subprocess on 127.0.0.1, called with httpx and the official openai
client."""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import openai
import pytest
from serve_fixture import (
    ASK_HELLO,
    ASK_TOOL,
    K2,
    TOOLS,
    shared_checkpoint,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.slow  # trains a tiny chat model and starts a server process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = start_server(shared_checkpoint(tmp_path_factory), "--max-tokens", "64")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_chat_text_answer(client):
    r = client.chat.completions.create(model="tiny-chat", messages=ASK_HELLO, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == "Hello there, friend!"
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_tool_call(client):
    r = client.chat.completions.create(
        model="tiny-chat", messages=ASK_TOOL, tools=TOOLS, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=ASK_HELLO,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, friend!"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # incremental
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"] and chunks[-1].usage.completion_tokens > 0


def test_chat_streaming_tool_call(client):
    stream = client.chat.completions.create(
        model="tiny-chat", messages=ASK_TOOL, tools=TOOLS, temperature=0, stream=True
    )
    chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_completions_and_stop(client, server):
    r = client.completions.create(
        model="tiny-chat", prompt="Say hello", max_tokens=8, temperature=0.8, seed=5
    )
    again = client.completions.create(
        model="tiny-chat", prompt="Say hello", max_tokens=8, temperature=0.8, seed=5
    )
    assert r.choices[0].text == again.choices[0].text and r.usage.completion_tokens >= 1
    stopped = client.chat.completions.create(
        model="tiny-chat", messages=ASK_HELLO, temperature=0, stop=["friend"]
    )
    assert stopped.choices[0].message.content == "Hello there, "
    assert stopped.choices[0].finish_reason == "stop"
    # streaming completions over raw SSE with httpx
    body = {"prompt": "Say hello", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as resp:
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_share_batches(client, server):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        return (
            client.chat.completions.create(model="tiny-chat", messages=ASK_HELLO, temperature=0)
            .choices[0]
            .message.content
        )

    before = httpx.get(f"{server}/health").json()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    after = httpx.get(f"{server}/health").json()
    assert answers == ["Hello there, friend!"] * 8
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some requests were decoded together


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "JSON"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": ASK_HELLO, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": ASK_HELLO, "max_tokens": 100000}, 400, "context"),
        ("/v1/completions", {"prompt": [999999]}, 400, "token ids"),
        ("/v1/completions", {}, 400, "prompt"),
        ("/v1/nope", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_4xx_json(server, path, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=ASK_HELLO, top_p=5)


def test_serve_missing_checkpoint_exits_2(tmp_path):
    r = subprocess.run(
        [K2, "serve", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.startswith("k2:")


def test_serve_port_in_use_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [K2, "serve", str(tmp_path / "nothing"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and "--port" in r.stderr
