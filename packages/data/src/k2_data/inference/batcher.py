"""Collect concurrent requests into engine batches, from any thread or event loop.

One worker thread owns the engine: it takes the first waiting request, gathers whatever else
arrives within `window_s` (up to the engine's max_batch_size) and runs them as one
`generate`. Callers get a concurrent Future (`submit`) or await (`agenerate`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future

from .engine import Completion, Engine, SamplingParams


class Batcher:
    """A background thread turning concurrent requests into batched `Engine.generate` calls."""

    def __init__(self, engine: Engine, *, window_s: float = 0.005):
        self.engine = engine
        self.window_s = window_s
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="k2-generate", daemon=True)
        self._thread.start()
        self.batches = 0  # generate calls made (observability and tests)
        self.requests = 0  # requests served
        self.cancelled = 0  # requests whose caller gave up (cancel event set) before the end

    def submit(self, prompt: list[int], params: SamplingParams) -> Future:
        """Queue one request; the Future resolves to its Completion (or its error)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        fut: Future = Future()
        self._queue.put((prompt, params, fut))
        return fut

    async def agenerate(self, prompt: list[int], params: SamplingParams) -> Completion:
        """Await one request's Completion."""
        return await asyncio.wrap_future(self.submit(prompt, params))

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.engine.max_batch_size:
                try:
                    item = self._queue.get(timeout=self.window_s)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._serve(batch)
            if stop:
                return

    def _serve(self, batch: list) -> None:
        live = [b for b in batch if b[2].set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.requests += len(live)
        try:
            outs = self.engine.generate([p for p, _, _ in live], [sp for _, sp, _ in live])
        except Exception:  # noqa: BLE001 - one bad request must not fail the others
            for prompt, params, fut in live:
                try:
                    fut.set_result(self.engine.generate([prompt], [params])[0])
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
            return
        for (_, _, fut), out in zip(live, outs, strict=True):
            self.cancelled += out.finish_reason == "cancelled"
            fut.set_result(out)
