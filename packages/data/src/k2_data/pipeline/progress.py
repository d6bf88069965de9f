"""Pipeline progress on the terminal: a rich bar on a TTY, a plain line every few seconds else."""

from __future__ import annotations

import sys
import time
from typing import Any


class PipelineProgress:
    """Items settled out of the total, with accepted/rejected/failed counts; a context manager."""

    def __init__(
        self,
        label: str,
        total: int,
        done: int = 0,
        enabled: bool = True,
        stream: Any = None,
        every_s: float = 5.0,
    ):
        self.label, self.total, self.done = label, total, done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self._bar: Any = None
        self._last = 0.0
        self.t0 = time.perf_counter()

    def __enter__(self) -> PipelineProgress:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.label, total=self.total, completed=self.done, info=""
            )
        return self

    def update(self, n: int, accepted: int, rejected: int, failed: int) -> None:
        """`n` more items settled; the running counts of this run."""
        self.done += n
        info = f"ok {accepted}  rejected {rejected}  failed {failed}"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=info)
        elif self.enabled and time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            print(f"{self.label}: {self.done}/{self.total}  {info}", file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
