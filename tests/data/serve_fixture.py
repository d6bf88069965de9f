"""A tiny k2 checkpoint that has memorised two chat answers (one a tool call), for serve tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from k2_core.config import ModelConfig, MoEConfig
from k2_core.model import build_model
from k2_core.modelio import save_model
from k2_data.chat import encode_chat, render
from k2_data.tokenizer import BpeTokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ASK_TOOL = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_ANSWER = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "functions.get_weather:0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ],
}
ASK_HELLO = [{"role": "user", "content": "Say hello."}]
HELLO_ANSWER = {"role": "assistant", "content": "Hello there, friend!"}
CONVERSATIONS = [(ASK_TOOL + [TOOL_ANSWER], TOOLS), (ASK_HELLO + [HELLO_ANSWER], None)]


def make_checkpoint(path: str, steps: int = 400) -> BpeTokenizer:
    """Train a tokenizer and a tiny MLA model on CONVERSATIONS; save both under `path`."""
    texts = [render(m, t) for m, t in CONVERSATIONS] * 4
    tok = BpeTokenizer.train(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    model = build_model((cfg, MoEConfig()))
    rows = [encode_chat(tok, m, t) for m, t in CONVERSATIONS]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, mask) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        for t in range(1, len(r)):
            if mask[t]:
                labels[i, t - 1] = r[t]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    save_model(model, path)
    tok.save(f"{path}/tokenizer")
    return tok


K2 = str(Path(sys.executable).parent / "k2")
_CHECKPOINTS: dict[str, str] = {}  # one trained checkpoint per test process (8 s each)


def shared_checkpoint(tmp_path_factory: Any) -> str:
    """The tiny chat checkpoint, trained once per pytest process and shared by the modules."""
    if "tiny" not in _CHECKPOINTS:
        path = str(tmp_path_factory.mktemp("serve") / "tiny-chat")
        make_checkpoint(path)
        _CHECKPOINTS["tiny"] = path
    return _CHECKPOINTS["tiny"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    ckpt: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> tuple[subprocess.Popen, str]:
    """`k2 serve ckpt *args` on a free loopback port; (process, base URL) once /health answers."""
    port = free_port()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        [K2, "serve", ckpt, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"k2 serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("k2 serve did not come up")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> str:
    """Terminate the server; its log (stdout and stderr)."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""
