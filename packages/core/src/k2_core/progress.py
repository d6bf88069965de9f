"""Training progress on the terminal: a rich bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainProgress:
    """Shows step, loss, lr, tokens/s, max attention logit and ETA; use as a context manager."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: Any = None):
        self.total, self.start = total_steps, start_step
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._bar: Any = None

    def __enter__(self) -> TrainProgress:
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]pretrain"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.start, info=""
            )
        return self

    def __call__(self, run: Any, metrics: dict[str, float]) -> None:
        """Update with a logged step's metrics."""
        info = (
            f"loss {metrics.get('train/loss', float('nan')):.4f}  "
            f"lr {metrics.get('train/lr', 0):.2e}  "
            f"{metrics.get('train/tokens_per_s', 0):,.0f} tok/s  "
            f"max logit {metrics.get('attn/max_logit', float('nan')):.1f}"
        )
        if "eval/loss" in metrics:
            info += f"  eval {metrics['eval/loss']:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=run.step, info=info)
            return
        done = run.step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - run.step)
        print(
            f"step {run.step}/{self.total}  {info}  eta {_fmt_eta(eta)}",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
