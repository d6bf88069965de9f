"""The `openai` generator against a real local OpenAI-compatible server with injected faults."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from k2_data.generators.openai_client import GenerationError, OpenAIOptions, build_openai
from synth_fake_llm import FakeEndpoint

USER = [{"role": "user", "content": "Rewrite.\n\n<passage>\nA is first. B is second.\n</passage>"}]


@pytest.fixture
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.stop()


def gen(ep: FakeEndpoint, **kw):
    opts = {"base_url": ep.base_url, "backoff": 0.01, "backoff_max": 0.05, **kw}
    return build_openai(options=OpenAIOptions(**opts))


def run(coro):
    return asyncio.run(coro)


def test_chat_discovers_model_and_counts_usage(endpoint):
    g = gen(endpoint)

    async def go():
        try:
            return await g.chat(USER, seed=1), await g.complete("Once upon a time")
        finally:
            await g.aclose()

    res, comp = run(go())
    assert res.message == {"role": "assistant", "content": "B is second. A is first."}
    assert res.finish_reason == "stop" and res.usage["prompt_tokens"] > 0
    assert comp.text == " and so on."
    assert g.describe()["model"] == "fake-llm"
    assert g.usage["requests"] == 3  # GET /models, chat, completion
    assert (
        g.usage["completion_tokens"]
        == res.usage["completion_tokens"] + comp.usage["completion_tokens"]
    )
    assert not g.errors


@pytest.mark.parametrize(
    "fault,kind",
    [
        ("500", "server_error"),
        ("429", "rate_limited"),
        ("garbage", "malformed"),
        ("nochoices", "malformed"),
    ],
)
def test_retryable_faults_are_retried_and_classified(endpoint, fault, kind):
    endpoint.llm.flaky = (fault,)
    g = gen(endpoint, model="fake-llm")
    res = run(g.chat(USER))
    assert res.message["content"] == "B is second. A is first."
    assert g.errors == {kind: 1} and g.usage["retries"] == 1 and g.usage["requests"] == 2


def test_retry_after_is_honoured(endpoint):
    endpoint.llm.flaky = ("429",)
    g = gen(endpoint, model="fake-llm", backoff=0.0, jitter=0.0)
    t0 = time.perf_counter()
    run(g.chat(USER))
    assert time.perf_counter() - t0 >= 0.05  # the server's Retry-After, not the 0 s backoff


def test_timeout_is_retried(endpoint):
    endpoint.llm.flaky, endpoint.llm.hang_s = ("timeout",), 1.5
    g = gen(endpoint, model="fake-llm", timeout_s=0.4)
    res = run(g.chat(USER))
    assert res.message["content"] and g.errors == {"timeout": 1}


def test_connection_refused_is_classified():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    g = build_openai(
        options=OpenAIOptions(
            base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff=0.0
        )
    )
    with pytest.raises(GenerationError) as e:
        run(g.chat(USER))
    assert e.value.error_kind == "connection" and g.errors == {"connection": 3}


def test_truncated_and_auth_are_not_retried(endpoint):
    g = gen(endpoint, model="fake-llm")
    with pytest.raises(GenerationError) as e:
        run(g.chat([{"role": "user", "content": "TRUNCATE me"}]))
    assert e.value.error_kind == "truncated"
    with pytest.raises(GenerationError) as e:
        run(g.chat([{"role": "user", "content": "UNAUTHORIZED"}]))
    assert e.value.error_kind == "auth" and e.value.status == 401
    assert g.usage["requests"] == 2 and g.usage["retries"] == 0
    ok = gen(endpoint, model="fake-llm", allow_truncated=True)
    assert run(ok.chat([{"role": "user", "content": "TRUNCATE me"}])).finish_reason == "length"


def test_api_key_sent_but_never_shown(endpoint, monkeypatch):
    monkeypatch.setenv("K2_TEST_KEY", "sk-very-secret")
    g = gen(endpoint, model="fake-llm", api_key_env="K2_TEST_KEY")
    run(g.chat(USER))
    assert endpoint.llm.auth[-1] == "Bearer sk-very-secret"
    with pytest.raises(GenerationError) as e:
        run(g.chat([{"role": "user", "content": "UNAUTHORIZED"}]))
    assert "sk-very" not in repr(g) + str(e.value) + repr(g.options)


def test_concurrency_is_bounded():
    ep = FakeEndpoint(latency_s=0.1)
    try:
        g = gen(ep, model="fake-llm", max_concurrency=3)

        async def go():
            msgs = [
                [{"role": "user", "content": f"Rewrite.\n\n<passage>\nN{i}.\n</passage>"}]
                for i in range(12)
            ]
            return await asyncio.gather(*(g.chat(m) for m in msgs))

        assert len(run(go())) == 12
        assert ep.llm.max_in_flight == 3
    finally:
        ep.stop()
