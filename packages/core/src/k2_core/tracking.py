"""Experiment tracking: the `tracker` slot's `mlflow` implementation.

Metrics are handed to a background thread so the training loop never waits on the store.
When the store or server fails, the batch is appended to `pending_metrics.jsonl` in the run
folder, one warning is printed, and the backlog is replayed as soon as logging works again:
training never stops for tracking, and no metric is lost.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PARAM_BATCH = 100  # mlflow's limit of params per log_batch call


class MLflowOptions(BaseModel):
    """Options of the mlflow tracker."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    system_metrics: bool = Field(True, description="Log CPU/memory/disk system metrics too.")
    sampling_interval: float = Field(10.0, gt=0, description="Seconds between system samples.")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {'a.b.c': 'value'} with values as strings (mlflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def default_tracking_uri(run_dir: str) -> str:
    """A local sqlite store inside the run folder, unless MLFLOW_TRACKING_URI says otherwise."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


class MLflowTracker:
    """Logs one k2 run to mlflow; only rank 0 creates one."""

    def __init__(
        self, *, tracking_uri: str | None, experiment: str, run_dir: str, options: MLflowOptions
    ):
        self.uri = tracking_uri or default_tracking_uri(run_dir)
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.options = options
        self.pending = self.run_dir / "pending_metrics.jsonl"
        self.run_id: str | None = None
        self._queue: queue.Queue[tuple[int, dict[str, float], int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._monitor: Any = None

    # -- set-up --------------------------------------------------------------------------
    def start(
        self,
        *,
        run_name: str,
        params: dict[str, str],
        config: dict[str, Any],
        run_id: str | None = None,
    ) -> str | None:
        """Create the run (or reopen `run_id` after a resume); returns the run id, or None
        when the store is unreachable (the worker keeps trying, metrics are spooled)."""
        import logging

        from mlflow.tracking import MlflowClient

        # mlflow narrates database migrations and monitor start/stop at INFO: keep the
        # terminal for k2's progress.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # mlflow's HTTP client otherwise retries for minutes; our own spool covers outages.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._spec = (run_name, params, config)
        self.run_id, self._resume_id = None, run_id
        try:
            self._open()
        except Exception as e:
            self._warn(
                f"tracking store {self.uri} unreachable ({type(e).__name__}); metrics kept "
                f"in {self.pending} and sent when it is back"
            )
        self._thread = threading.Thread(target=self._worker, name="k2-mlflow", daemon=True)
        self._thread.start()
        return self.run_id

    def _open(self) -> None:
        """Create or reopen the mlflow run (params and config logged once, at creation)."""
        from mlflow.entities import Param

        run_name, params, config = self._spec
        if self._resume_id is not None:
            self.client.update_run(self._resume_id, status="RUNNING")
            self.run_id = self._resume_id
        else:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = None
                if self.uri.startswith("sqlite:"):
                    loc = (self.run_dir.resolve() / "artifacts").as_uri()
                exp_id = self.client.create_experiment(self.experiment, artifact_location=loc)
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(
                exp_id, run_name=run_name, tags={"k2.run_dir": str(self.run_dir)}
            )
            items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), PARAM_BATCH):
                self.client.log_batch(run.info.run_id, params=items[i : i + PARAM_BATCH])
            self.client.log_dict(run.info.run_id, config, "config.json")
            self.run_id = run.info.run_id
        if self.options.system_metrics:
            self._start_system_metrics(resumed=self._resume_id is not None)

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.options.sampling_interval,
                resume_logging=resumed,
                tracking_uri=self.uri,
            )
            self._monitor.start()
        except Exception as e:  # psutil missing or unsupported platform: not fatal
            self._warn(f"system metrics off ({type(e).__name__}: {e})")

    # -- logging -------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics of `step`; returns at once."""
        self._queue.put((step, dict(metrics), int(time.time() * 1000)))

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            step, metrics, ts = item
            try:
                if self.run_id is None:
                    self._open()
                self._replay_pending()
                self._send(step, metrics, ts)
            except Exception as e:
                self._spool(step, metrics, ts)
                self._warn(
                    f"tracking store unreachable ({type(e).__name__}); metrics kept in "
                    f"{self.pending} and sent when it is back"
                )
            finally:
                self._queue.task_done()

    def _send(self, step: int, metrics: dict[str, float], ts: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=True)

    def _spool(self, step: int, metrics: dict[str, float], ts: int) -> None:
        with self.pending.open("a") as f:
            f.write(json.dumps({"step": step, "ts": ts, "metrics": metrics}) + "\n")

    def _replay_pending(self) -> None:
        if not self.pending.exists():
            return
        lines = self.pending.read_text().splitlines()
        for i, line in enumerate(lines):
            rec = json.loads(line)
            try:
                self._send(rec["step"], rec["metrics"], rec["ts"])
            except Exception:
                self.pending.write_text("".join(x + "\n" for x in lines[i:]))
                raise
        self.pending.unlink()

    def _warn(self, msg: str) -> None:
        if not self._warned:
            print(f"k2: warning: {msg}", file=sys.stderr)
            self._warned = True

    def flush(self, timeout: float = 60.0) -> None:
        """Wait (up to `timeout` s) until queued metrics are sent or spooled."""
        deadline = time.time() + timeout
        while self._queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.05)

    def end(self, status: str) -> None:
        """Flush, stop background work and mark the run with `status`."""
        self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
        try:
            if self.run_id is None:
                self._open()
            self._replay_pending()
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self._warn(f"could not close the mlflow run ({type(e).__name__}: {e})")


def build_mlflow(
    *, tracking_uri: str | None, experiment: str, run_dir: str, options: MLflowOptions
) -> MLflowTracker:
    """mlflow: local sqlite store in the run folder by default, any tracking URI by config."""
    return MLflowTracker(
        tracking_uri=tracking_uri, experiment=experiment, run_dir=run_dir, options=options
    )
