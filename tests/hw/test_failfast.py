"""A rank killed mid-run makes the others fail fast with one clear line (not a hang past
`parallel.options.timeout_s`), and restarting the job resumes from the last checkpoint.

The job is two `python -m k2_core.cli pretrain ... parallel.backend=h800` processes started
with torchrun's environment variables (no torchrun agent, which would kill the survivors
itself and hide the backend's own failure handling)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from small_model import small_model

TIMEOUT_S = 30
ARGS = [
    "tiny",
    *small_model(),
    "train.steps=16",
    "train.micro_batch_size=1",
    "train.log_every=1",
    "train.eval_every=0",
    "tracking.tracker=null",
    "checkpoint.every=2",
    "parallel.backend=h800",
    "parallel.options.ep=2",
    f"parallel.options.timeout_s={TIMEOUT_S}",
]

PREPARE = """
from k2_core.configio import load_config
from k2_core.orchestrator import build_dataset
from k2_core.plugins import get_plugins
build_dataset(load_config("tiny", ["tracking.tracker=null"]), get_plugins(), "train")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, cache, port):
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "K2_CACHE_DIR": str(cache),
            "K2_LOAD_PLUGINS": "optim,moe,data,hw_h800",
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "k2_core.cli",
                    "pretrain",
                    *ARGS,
                    f"checkpoint.dir={run_dir}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_fails_fast_and_restart_resumes(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    # build the data cache once first: two ranks preparing the same corpus at once would race
    env = {**os.environ, "K2_CACHE_DIR": str(cache), "K2_LOAD_PLUGINS": "optim,moe,data"}
    subprocess.run([sys.executable, "-c", PREPARE], env=env, check=True, timeout=600)
    procs = _launch(run_dir, cache, _free_port())
    marker = run_dir / "checkpoints" / "step_00000002" / "k2_commit.json"
    deadline = time.time() + 600
    while not marker.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        for p in procs:
            p.kill()
        pytest.fail("no checkpoint: " + " | ".join(p.communicate()[1][-2000:] for p in procs))
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[1].communicate()
    out, err = procs[0].communicate(timeout=TIMEOUT_S + 60)
    waited = time.time() - killed_at
    assert procs[0].returncode == 2, err[-3000:]
    assert waited < TIMEOUT_S + 30
    line = [ln for ln in err.splitlines() if ln.startswith("k2: distributed error:")]
    assert line and "rank 0" in line[0] and "restart the job" in line[0], err[-3000:]
    assert "Traceback" not in err

    done = sorted(
        int(p.name[5:])
        for p in (run_dir / "checkpoints").glob("step_*")
        if (p / "k2_commit.json").exists()
    )
    procs = _launch(run_dir, cache, _free_port())
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:]
    steps = [int(m) for m in re.findall(r"^step (\d+)/16", results[0][1], re.M)]
    assert steps[0] == done[-1] + 1 and steps[-1] == 16  # resumed after the last checkpoint
