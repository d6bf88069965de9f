"""`k2 serve --push-port`: a real server receives a new version by the bucketed weight push
(k2_core.weight_push), authenticated by its API key, and its next completions come from the new
weights; a wrong key is refused in one line and the server keeps its version. `k2 rl` with
engine=openai and weight_update=k2-push runs an iteration through it, nothing written to disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from rl_fixtures import save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from serve_fixture import K2, free_port, start_server, stop_server  # noqa: E402

KEY = "test-key-serve-push"
TOL = 1e-4  # float32 on both sides, different summation order (see test_engine_openai.py)


def _completion_lps(base: str, prompt: list[int]) -> tuple[list[int], list[float], int]:
    from k2_rl.engine_openai import parse_completion

    r = httpx.post(
        f"{base}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "init",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0.0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
        timeout=60,
    )
    r.raise_for_status()
    body = r.json()
    ids, lps = parse_completion(body["choices"][0], "k2 serve")
    return ids, lps, int(body["weights_version"])


@pytest.mark.slow
def test_k2_serve_loads_a_pushed_version(tmp_path):
    from k2_core.modelio import load_model
    from k2_core.weight_push import WeightPusher, WeightPushError
    from k2_rl.engine_openai import trainer_logprobs

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    push_port = free_port()
    proc, base = start_server(init, "--push-port", str(push_port), env={"K2_SERVE_API_KEY": KEY})
    try:
        model = load_model(init)
        with torch.no_grad():  # version 1: other weights
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        prompt = [5, 6, 7, 8]
        with pytest.raises(WeightPushError, match="push token") as info:
            WeightPusher([("127.0.0.1", push_port)], token="wrong").push(model, 1)
        assert "\n" not in str(info.value)
        _, _, version = _completion_lps(base, prompt)
        assert version == 0  # refused: the server kept its version

        stats = WeightPusher([("127.0.0.1", push_port)], token=KEY, bucket_mb=0.05).push(model, 1)
        assert stats.buckets > 1  # several buckets, each checked
        ids, lps, version = _completion_lps(base, prompt)
        assert version == 1
        mine = trainer_logprobs(model, prompt, ids)
        gap = max(abs(a - b) for a, b in zip(lps, mine, strict=True))
        assert gap <= TOL, gap  # the server now runs the pushed weights
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_an_rl_iteration_with_weight_update_k2_push(tmp_path, monkeypatch):
    from k2_core.configio import load_config
    from k2_rl.builtin_configs import config_path
    from k2_rl.rl_stage import RLTrainer

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    push_port = free_port()
    proc, base = start_server(
        init, "--push-port", str(push_port), "--max-batch-size", "16", env={"K2_SERVE_API_KEY": KEY}
    )
    monkeypatch.setenv("K2_TEST_PUSH_KEY", KEY)
    try:
        cfg = load_config(
            config_path("rl-math"),
            [
                f"plugins.rl.init={init}",
                f"checkpoint.dir={tmp_path / 'rl'}",
                "train.steps=1",
                "plugins.rl.engine=openai",
                f"plugins.rl.openai.base_url={base}/v1",
                "plugins.rl.openai.api_key_env=K2_TEST_PUSH_KEY",
                "plugins.rl.openai.weight_update=k2-push",
                f"plugins.rl.openai.push_address=127.0.0.1:{push_port}",
                "plugins.rl.openai.logprob_tolerance=1e-4",
                "plugins.rl.openai.concurrency=8",
                "train.eval_every=0",
                "checkpoint.every=100",
                "plugins.rl.eval_prompts=0",
                "data.seq_len=128",
                "data.options.builtin_n=50",
                "optim.lr=2e-2",
                "plugins.rl.k=4",
                "plugins.rl.prompts_per_iter=2",
                "plugins.rl.default_budget=14",
                "plugins.rl.partial_rollout=false",
                "tracking.tracker=null",
                "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 14}]",
            ],
        )
        trainer = RLTrainer(cfg)
        try:
            assert trainer.engine.version == 0 and trainer.sync.pushes == 1  # the start: full
            m = trainer.iteration()
            assert trainer.engine.version == 1 and trainer.sync.pushes == 2
            assert m["rl/groups"] >= 1 and trainer.sync.last_check <= TOL
            assert trainer.sync.last_bytes > 0
            assert not (tmp_path / "rl" / "engine-weights").exists()  # nothing on disk
            _, _, version = _completion_lps(base, [5, 6, 7])
            assert version == 1
        finally:
            trainer.close()
    finally:
        stop_server(proc)


def test_push_port_without_an_api_key_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "K2_SERVE_API_KEY"}
    out = subprocess.run(
        [
            K2,
            "serve",
            str(tmp_path / "missing"),
            "--port",
            str(free_port()),
            "--push-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--push-port" in out.stderr and "API key" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
