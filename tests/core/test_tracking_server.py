"""Tracking against a real `mlflow server` on 127.0.0.1 that goes down mid-run and comes back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from k2_core import hookimpl
from toy_run import ToyPlugin, make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An mlflow tracking server subprocess with a sqlite store that survives restarts."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [
                mlflow,
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--default-artifact-root",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "server.log", "ab"),
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"mlflow server did not come up:\n{(self.root / 'server.log').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    s = Server(tmp_path / "srv")
    s.start()
    yield s
    s.stop()


class Outage:
    """Takes the server down after step `down` and brings it back after step `up`."""

    def __init__(self, server: Server, down: int, up: int):
        self.server, self.down, self.up = server, down, up

    @hookimpl
    def k2_on_step_end(self, run, step, metrics):
        if step == self.down:
            run_tracker = run.plugins.pm.get_plugin("k2-tracker").tracker
            run_tracker.flush()
            self.server.stop()
        elif step == self.up:
            self.server.start()


@pytest.mark.slow
def test_server_outage_loses_no_metric(tmp_path, server, capsys):
    from mlflow.tracking import MlflowClient

    run = make(
        tmp_path,
        "train.steps=10",
        f"tracking.tracking_uri={server.uri}",
        "checkpoint.every=100",
        plugin=ToyPlugin(),
    )
    run.plugins.pm.register(Outage(server, down=3, up=7), name="outage")
    from k2_core.orchestrator import train

    summary = train(run)
    assert summary["steps"] == 10
    assert "unreachable" in capsys.readouterr().err
    client = MlflowClient(server.uri)
    r = client.get_run(summary["tracking_run_id"])
    steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss"))
    assert steps == list(range(1, 11))
    assert r.info.status == "FINISHED"
    assert not (tmp_path / "run" / "pending_metrics.jsonl").exists()
