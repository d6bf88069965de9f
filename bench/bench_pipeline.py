"""Synthesis pipeline throughput against a local OpenAI-compatible endpoint with a fixed
latency: records/s of `k2 rephrase`'s engine at concurrency 1 vs 32 (target: >= 20x).

The endpoint is a minimal ASGI app under uvicorn on 127.0.0.1 that sleeps `--latency-ms` per
request and returns the passage's sentences reversed (so the lexical fidelity check passes).
Everything else is the real pipeline: the `openai` generator over httpx, sharding, commits.
Run: `uv run python bench/bench_pipeline.py [--latency-ms 50] [--items-per-slot 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile
import time


def make_app(latency_s: float):
    """An ASGI app answering /v1/models and /v1/chat/completions after `latency_s`."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["path"].endswith("/models"):
            out = {"data": [{"id": "bench"}]}
        else:
            await asyncio.sleep(latency_s)
            req = json.loads(body)
            m = re.search(r"<passage>\n(.*?)\n</passage>", req["messages"][-1]["content"], re.S)
            sents = re.split(r"(?<=\.)\s+", m.group(1) if m else "")
            out = {
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": " ".join(reversed(sents))},
                    }
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20},
            }
        data = json.dumps(out).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


def serve(latency_s: float) -> tuple[str, subprocess.Popen]:
    """Start the endpoint in its own process (as a real server would be); URL and process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--latency-ms", str(latency_s * 1000)]
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", proc


def _serve_forever(port: int, latency_s: float) -> None:
    import uvicorn

    uvicorn.run(make_app(latency_s), host="127.0.0.1", port=port, log_level="error", backlog=1024)


def _cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of process `pid`."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_once(base_url: str, concurrency: int, n_items: int, root: str) -> tuple[float, int]:
    """(records/s, records) of one fresh rephrase run of `n_items` items."""
    from k2_data.rephrase import RephraseConfig, run_rephrase

    docs = f"{root}/docs-{concurrency}.jsonl"
    with open(docs, "w") as f:
        for i in range(n_items):
            f.write(
                json.dumps(
                    {
                        "id": f"b{i}",
                        "text": f"Station {i} lies on line {i % 7}. "
                        f"It opened in year {1900 + i}. It has {i % 5 + 1} exits.",
                    }
                )
                + "\n"
            )
    cfg = RephraseConfig.model_validate(
        {
            "source": {"uri": docs},
            "n_rephrasings": 1,
            "generator": {
                "options": {"base_url": base_url, "model": "bench", "max_concurrency": concurrency}
            },
            "pipeline": {
                "out": f"{root}/out-{concurrency}",
                "concurrency": concurrency,
                "shard_size": 64,
                "tracking": False,
                "progress": False,
            },
        }
    )
    t0 = time.perf_counter()
    s = run_rephrase(cfg)
    dt = time.perf_counter() - t0
    assert s.complete and s.records == n_items, s.line()
    return s.records / dt, s.records


def main() -> None:
    """Measure and print the side-by-side table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument(
        "--items-per-slot",
        type=int,
        default=20,
        help="items per unit of concurrency (run length ~ this x latency)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        _serve_forever(args.serve, args.latency_ms / 1000)
        return
    base_url, server = serve(args.latency_ms / 1000)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        run_once(base_url, 4, 16, tempfile.mkdtemp(dir=root))  # imports, first connections
        for c in args.concurrency:
            cpu0, srv0 = _cpu(), _cpu(server.pid)
            rate, n = run_once(base_url, c, args.items_per_slot * c, root)
            rows.append(
                (c, n, rate, 1000 * (_cpu() - cpu0) / n, 1000 * (_cpu(server.pid) - srv0) / n)
            )
    server.terminate()
    server.wait()
    base = rows[0][2]
    ideal = 1000 / args.latency_ms
    print(f"endpoint latency {args.latency_ms:.0f} ms (ideal {ideal:.0f} records/s per slot)")
    print(
        f"{'concurrency':>11} | {'records':>7} | {'records/s':>9} | {'vs c=' + str(rows[0][0]):>7}"
        f" | {'of ideal':>8} | client CPU ms/record | server CPU ms/record"
    )
    for c, n, rate, ccpu, scpu in rows:
        print(
            f"{c:>11} | {n:>7} | {rate:>9.1f} | {rate / base:>6.1f}x | "
            f"{100 * rate / (ideal * c):>7.0f}% | {ccpu:>20.2f} | {scpu:>20.2f}"
        )


if __name__ == "__main__":
    main()
