"""`k2 rl` under the h800 backend (issue 16): rollouts, rewards and training spread over the
data ranks, gradients reduced by the backend, engines fed by the sharded weight push. DP2 and
DP2 x EP2 give the rewards, losses and weights of one process with the same seeds, with partial
rollouts, budgets, the temperature decay and PTX on; a DP2 checkpoint resumes in one process;
what does not run distributed is refused in one line."""

from __future__ import annotations

import shutil

import pytest
import torch
from rl_fixtures import assert_weights_close, final_weights, run_ranks, tie_free_checkpoint

STEPS = 3
# fp32 weights (parallel.options.dtype=fp32), fp32 Newton-Schulz and tie-free routing (below):
# the runs differ only in float summation order (each rank's engine batches other requests,
# each rank sums its own responses' losses), so the same tokens are sampled and rewards are
# equal; losses and weights agree to ~1e-6 relative; bounds 20-50x that
LOSS_TOL = 1e-4
WEIGHT_TOL = 5e-5
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    "data.seq_len=128",
    "data.options.builtin_n=40",
    "optim.lr=3e-3",
    "optim.options.ns_dtype=float32",
    "moe.bias_update_speed=0.0",
    "tracking.tracker=null",
    "plugins.rl.k=4",
    "plugins.rl.prompts_per_iter=3",
    "plugins.rl.segment_tokens=6",
    "plugins.rl.default_budget=12",
    "plugins.rl.eval_prompts=0",
    "plugins.rl.micro_batch_size=3",
    "plugins.rl.max_version_lag=1",
    "plugins.rl.ptx_weight=0.5",
    "train.micro_batch_size=1",
    "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 12}]",
]
H800 = ["parallel.backend=h800", "parallel.options.dtype=fp32"]
PLUGINS = "optim,moe,data,hw_h800,rl"


def _cfg(init: str, run_dir: str, extra: list[str]):
    from k2_core.configio import load_config
    from k2_rl.builtin_configs import config_path

    return load_config(
        config_path("rl-math"),
        [f"plugins.rl.init={init}", f"checkpoint.dir={run_dir}", *OVERRIDES, *extra],
    )


KEYS = (
    "rl/reward_mean",
    "rl/loss",
    "rl/groups",
    "rl/response_tokens",
    "train/grad_norm",
    "rl/entropy",
    "rl/log_ratio_mean",
    "rl/ptx_loss",
)


def _run(init: str, run_dir: str, extra: list[str]) -> list[dict[str, float]]:
    from k2_rl.rl_stage import RLTrainer

    trainer = RLTrainer(_cfg(init, run_dir, extra))
    trainer.train()
    return [{k: h[k] for k in KEYS} for h in trainer.history]


def _spawn(world: int, init: str, run_dir: str, extra: list[str]) -> list[dict[str, float]]:
    # every rank logs the same metrics
    return run_ranks(world, PLUGINS, _run, (init, run_dir, [*H800, *extra]), f"{run_dir}.history")


def _weights(run_dir: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return final_weights(run_dir, step)


def _same(one: list[dict[str, float]], other: list[dict[str, float]]) -> None:
    assert len(one) == len(other)
    for a, b in zip(one, other, strict=True):
        # the same groups, sampled tokens and rewards; the loss up to summation order
        for k in ("rl/reward_mean", "rl/groups", "rl/response_tokens"):
            assert a[k] == b[k], (k, a, b)
        for k in ("rl/loss", "rl/entropy", "rl/log_ratio_mean", "train/grad_norm", "rl/ptx_loss"):
            assert abs(a[k] - b[k]) <= LOSS_TOL * max(1.0, abs(a[k])), (k, a, b)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert_weights_close(a, b, WEIGHT_TOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_rl_under_h800_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_LOAD_PLUGINS", PLUGINS)
    init = tie_free_checkpoint(tmp_path / "init")
    # PTX: each data rank reads one row of the `data` section a step = one process's 2
    # micro-batches of 1 (the mean of their means)
    one = _run(init, str(tmp_path / "one"), ["train.grad_accum=2"])
    assert len(one) == STEPS and any(h["rl/loss"] != 0 for h in one)  # something was learnt
    dp2 = _spawn(2, init, str(tmp_path / "dp2"), [])
    _same(one, dp2)
    _close(_weights(str(tmp_path / "one")), _weights(str(tmp_path / "dp2")))
    # one engine per node: rank 0 generates for both, rank 1 holds no engine
    node = _spawn(2, init, str(tmp_path / "node"), ["plugins.rl.rollout_engines=node"])
    _same(one, node)
    # the DP2 run's step-2 checkpoint (sharded, with the rollout state) resumes in one process
    again = tmp_path / "again"
    shutil.copytree(
        tmp_path / "dp2" / "checkpoints" / "step_00000002", again / "checkpoints" / "step_00000002"
    )
    rest = _run(init, str(again), ["train.grad_accum=2"])
    _same(one[2:], rest)
    _close(_weights(str(tmp_path / "one")), _weights(str(again)))


@pytest.mark.slow
@pytest.mark.distributed
def test_rl_under_dp2_ep2_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_LOAD_PLUGINS", PLUGINS)
    init = tie_free_checkpoint(tmp_path / "init")
    one = _run(init, str(tmp_path / "one"), ["train.grad_accum=4"])
    # 4 data ranks, experts split over 2: ranks with fewer micro-batches run padding ones
    dpep = _spawn(4, init, str(tmp_path / "dpep"), ["parallel.options.ep=2"])
    _same(one, dpep)
    _close(_weights(str(tmp_path / "one")), _weights(str(tmp_path / "dpep")))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["parallel.options.pp=2"], "parallel.options.pp"),
        (["plugins.rl.engine=process"], "plugins.rl.engine"),
        (["plugins.rl.critic.enabled=true"], "plugins.rl.critic.enabled"),
    ],
)
def test_rl_refuses_what_does_not_run_distributed(tmp_path, extra, field):
    from k2_core.errors import ConfigError
    from k2_rl.rl_stage import prepare_rl_config

    cfg = _cfg(str(tmp_path), str(tmp_path / "rl"), ["parallel.backend=h800", *extra])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        prepare_rl_config(cfg)
    assert "\n" not in str(info.value)
