"""`k2 sft` then `k2 rl` as a user runs them (subprocesses), and their one-line config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

K2 = str(Path(sys.executable).parent / "k2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rl"))


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sft_then_rl_from_the_command_line(tmp_path, env):
    from rl_fixtures import save_tiny_checkpoint

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    sft = subprocess.run(
        [
            K2,
            "sft",
            f"plugins.sft.init={init}",
            f"checkpoint.dir={tmp_path / 'sft'}",
            "train.steps=4",
            "checkpoint.every=4",
            "train.eval_every=0",
            "train.micro_batch_size=2",
            "data.seq_len=128",
            "data.options.builtin_n=40",
            "tracking.tracker=null",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sft.returncode == 0, sft.stderr[-2000:]
    s = json.loads(sft.stdout.strip().splitlines()[-1])
    assert s["steps"] == 4 and s["last_loss"] is not None
    rl = subprocess.run(
        [
            K2,
            "rl",
            "rl-math",
            f"plugins.rl.init={tmp_path / 'sft'}",
            f"checkpoint.dir={tmp_path / 'rl'}",
            "train.steps=2",
            "checkpoint.every=2",
            "train.eval_every=2",
            "plugins.rl.k=2",
            "plugins.rl.prompts_per_iter=2",
            "plugins.rl.default_budget=8",
            "plugins.rl.tasks=[{name: math}]",
            "plugins.rl.eval_prompts=2",
            "tracking.tracker=null",
            "data.options.builtin_n=20",
            "data.seq_len=128",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert rl.returncode == 0, rl.stderr[-2000:]
    assert "rl step 2:" in rl.stdout and "k2 rl: 2 iterations" in rl.stdout
    assert "math held-out pass@1" in rl.stdout
    assert (tmp_path / "rl" / "checkpoints" / "step_00000002" / "tokenizer").is_dir()


def test_rl_config_errors_are_one_line(tmp_path, env):
    bad = subprocess.run(
        [K2, "rl", "plugins.rl.k=1", f"plugins.rl.init={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("k2: config error: plugins.rl.k") and bad.stderr.count("\n") == 1
    missing = subprocess.run(
        [K2, "sft", f"plugins.sft.init={tmp_path / 'nothing'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "k2: checkpoint error:" in missing.stderr


@pytest.mark.slow
def test_rl_demo_quick_runs_every_stage(tmp_path, env):
    """`k2 rl-demo --quick`: pretrain -> sft -> rl (2 seeds) -> code run, with the report."""
    out = tmp_path / "demo"
    demo = subprocess.run(
        [
            K2,
            "rl-demo",
            "--quick",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out),
            "--threads",
            "1",
            "--json",
        ],
        env={**env, "K2_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["rl"]) == {"0", "1"}
    for kind in ("greedy", "sampled"):
        assert 0.0 <= report["sft"]["pass@1"][kind] <= 1.0
        assert len(report[f"rl_{kind}"]["gains"]) == 2
    assert report["code"]["iterations"] == 1
    assert "after RL (2 iterations), greedy" in report["summary"]
    assert set(report["rl_greedy"]["flips"]) == {"0", "1"}
    assert "greedy answers RL changed on the same problems" in report["summary"]
    assert (out / "rl_math.png").exists() and (out / "mlflow.db").exists()
