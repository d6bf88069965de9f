"""`k2 pretrain` killed with SIGKILL and rerun equals an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

K2 = str(Path(sys.executable).parent / "k2")
SMALL = [
    "tiny",
    "train.steps=20",
    "checkpoint.every=10",
    "model.num_hidden_layers=2",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.eval_every=10",
    "tracking.options.system_metrics=false",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("k2cache")
    return {**os.environ, "K2_CACHE_DIR": str(cache), "K2_LOAD_PLUGINS": "optim,moe,data"}


def _losses(run_dir: Path) -> dict[int, set[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    out: dict[int, set[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):
        out.setdefault(m.step, set()).add(m.value)
    return out


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, env):
    from k2_core.checkpoint import load_tensors

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(
        [K2, "pretrain", *SMALL, f"checkpoint.dir={straight}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=900,
    )

    proc = subprocess.Popen(
        [K2, "pretrain", *SMALL, f"checkpoint.dir={broken}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = broken / "checkpoints" / "step_00000010" / "k2_commit.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the first checkpoint never appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(
        [K2, "pretrain", *SMALL, f"checkpoint.dir={broken}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]

    a, _ = load_tensors(str(straight / "checkpoints" / "step_00000020"))
    b, _ = load_tensors(str(broken / "checkpoints" / "step_00000020"))
    for group in ("model", "optim"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}/{k}"
    la, lb = _losses(straight), _losses(broken)
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    for step, values in lb.items():  # steps logged twice (before the kill and after) agree too
        assert values == la[step], step
