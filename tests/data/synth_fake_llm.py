"""A deterministic OpenAI-compatible endpoint on a real local HTTP server (pytest-httpserver),
for the synthesis tests: plausible outputs per prompt, and failures injected on demand.

Replies: a rephrase is the passage's sentences in reverse order (a passage holding UNFAITHFUL
gets unrelated text); judges say faithful/passed (a task holding IMPOSSIBLE fails); domain
evolution returns sub-domains and tool specs (one invalid, one duplicate per sub-domain);
the agent calls its first tool once, then answers; the user simulator asks, then says [DONE];
the tool simulator counts calls in its state.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import zlib
from collections import Counter
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

_SENT = re.compile(r"(?<=[.!?])\s+")


def _tag(text: str, name: str) -> str | None:
    m = re.search(rf"<{name}>\n(.*?)\n</{name}>", text, re.S)
    return m.group(1) if m else None


def reorder(passage: str) -> str:
    """The rephrase of the fake model: sentences in reverse order."""
    sents = [s for s in _SENT.split(passage.strip()) if s]
    return " ".join(reversed(sents))


class FakeLLM:
    """The handler state: request counts and the failure schedule."""

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # attempts per prompt key
        self.requests = 0
        self.flaky: tuple[str, ...] = ()  # faults cycled over first attempts of each prompt
        self.always_fail_marker: str | None = None  # prompts holding it always get a 500
        self.down = False  # every request 503s (a dead backend behind a live proxy)
        self.hang_s = 3.0  # how long a "timeout" fault sleeps
        self.in_flight = self.max_in_flight = 0
        self.auth: list[str | None] = []  # Authorization headers seen

    # -- dispatch ------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        """Route one HTTP request, tracking how many are in flight."""
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth.append(request.headers.get("Authorization"))
        try:
            return self._handle(request)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handle(self, request: Request) -> Response:
        if request.path.endswith("/models"):
            return self._json({"object": "list", "data": [{"id": "fake-llm", "object": "model"}]})
        body = request.get_json(force=True, silent=True) or {}
        key = json.dumps(body.get("messages") or body.get("prompt"), sort_keys=True)
        with self.lock:
            self.requests += 1
            self.calls[key] += 1
            attempt = self.calls[key]
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.down:
            return Response("backend gone", status=503)
        if "UNAUTHORIZED" in key:
            return Response('{"error": "bad key"}', status=401, content_type="application/json")
        if self.always_fail_marker and self.always_fail_marker in key:
            return Response('{"error": "boom"}', status=500, content_type="application/json")
        if self.flaky and attempt == 1:
            fault = self.flaky[zlib.crc32(key.encode()) % len(self.flaky)]
            if fault == "500":
                return Response(
                    '{"error": "internal"}', status=500, content_type="application/json"
                )
            if fault == "429":
                return Response(
                    '{"error": "slow down"}',
                    status=429,
                    headers={"Retry-After": "0.05"},
                    content_type="application/json",
                )
            if fault == "garbage":
                return Response("{not json at all", status=200, content_type="application/json")
            if fault == "nochoices":
                return self._json({"id": "x", "choices": []})
            if fault == "timeout":
                time.sleep(self.hang_s)
        if request.path.endswith("/completions") and "messages" not in body:
            return self._json(
                {
                    "choices": [{"index": 0, "text": " and so on.", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3},
                }
            )
        msg = self.reply(body.get("messages", []), body.get("tools"))
        finish = "tool_calls" if msg.get("tool_calls") else "stop"
        if "TRUNCATE" in key:
            finish = "length"
        return self._json(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": len(key) // 4,
                    "completion_tokens": len(json.dumps(msg)) // 4,
                },
            }
        )

    @staticmethod
    def _json(obj: Any) -> Response:
        return Response(json.dumps(obj), status=200, content_type="application/json")

    # -- the "model" ---------------------------------------------------------------------
    def reply(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        """The assistant message for a conversation."""
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")

        def text(t: str) -> dict[str, Any]:
            return {"role": "assistant", "content": t}

        if "check rewrites for fidelity" in system:
            return text(json.dumps({"faithful": True, "score": 0.9, "reason": "same facts"}))
        if user and _tag(user, "passage") is not None:
            passage = _tag(user, "passage") or ""
            if "UNFAITHFUL" in passage:
                return text("Bananas are yellow fruit grown in warm places worldwide.")
            return text(reorder(passage))
        if "design tool ecosystems" in system:
            dom = re.search(r"Domain: (.*)", user).group(1).strip()
            if '"subdomains"' in user:
                return text(json.dumps({"subdomains": [f"{dom} records", f"{dom} scheduling"]}))
            sub = re.search(r"Sub-domain: (.*)", user).group(1).strip()
            base = re.sub(r"[^a-z0-9]+", "_", sub.lower()).strip("_")
            params = {
                "type": "object",
                "properties": {"item_id": {"type": "string"}},
                "required": ["item_id"],
            }
            tools_ = [
                {
                    "name": f"{base}_get",
                    "description": f"Get one {sub} item.",
                    "parameters": params,
                },
                {
                    "name": f"{base}_update",
                    "description": f"Update one {sub} item.",
                    "parameters": params,
                },
                {"name": f"{base}_get", "description": "duplicate", "parameters": params},
                {"name": "bad tool!", "description": "invalid name", "parameters": params},
            ]
            return text("Here you go:\n```json\n" + json.dumps({"tools": tools_}) + "\n```")
        if "write tasks for evaluating" in system:
            names = re.findall(r'"name": "([a-z0-9_]+)"', user)
            desc = "Look up item A-7 and report it."
            tasks = [
                {
                    "description": desc,
                    "success_criteria": ["item reported"],
                    "expected_tools": names[:1],
                    "checkpoints": ["calls the getter"],
                },
                {
                    "description": "Update item B-2. IMPOSSIBLE"
                    if "records" in user
                    else "Update item B-2.",
                    "success_criteria": ["item updated"],
                    "expected_tools": names[1:2],
                    "checkpoints": ["calls the updater"],
                },
            ]
            return text(json.dumps({"tasks": tasks}))
        if "role-playing a user" in system:
            said = sum(m["role"] == "assistant" for m in messages)
            goal = re.search(r"Your goal: (.*)", system).group(1)
            return text("[DONE]" if said else f"Hi, please help me: {goal}")
        if "simulate the backend" in system:
            state = json.loads(_tag(user, "state") or "{}")
            n = int(state.get("calls", 0)) + 1
            call = json.loads(_tag(user, "call") or "{}")
            return text(
                json.dumps(
                    {
                        "result": {"ok": True, "call_no": n, "echo": call},
                        "state": {**state, "calls": n},
                    }
                )
            )
        if "grade an assistant" in system:
            ok = "IMPOSSIBLE" not in user
            return text(
                json.dumps(
                    {
                        "score": 0.9 if ok else 0.2,
                        "passed": ok,
                        "reasons": "rubric met" if ok else "not done",
                    }
                )
            )
        if tools:
            last = messages[-1]
            if last["role"] == "user":
                fn = tools[0]["function"]
                props = fn["parameters"].get("properties", {})
                args = {
                    k: v["enum"][0] if "enum" in v else ("A-7" if v.get("type") == "string" else 7)
                    for k, v in props.items()
                }
                return {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"functions.{fn['name']}:0",
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": json.dumps(args)},
                        }
                    ],
                }
            return text(f"Done. The tool said: {last.get('content', '')[:200]}")
        return text("I cannot tell what you want.")


class FakeEndpoint:
    """A started threaded HTTP server at 127.0.0.1 serving FakeLLM at /v1."""

    def __init__(self, latency_s: float = 0.0, port: int = 0):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.llm = FakeLLM(latency_s)
        self.server = HTTPServer(host="127.0.0.1", port=port, threaded=True)
        self.server.expect_request(re.compile(r"/v1/.*")).respond_with_handler(self.llm.handle)
        self.server.start()
        self.base_url = f"http://127.0.0.1:{self.server.port}/v1"

    def stop(self) -> None:
        """Stop the server (new connections are refused)."""
        if self.server.is_running():
            self.server.stop()
