"""A short `k2 rl` on a tiny model: rollouts, rewards, K1.5 steps, sync, metrics, resume."""

from __future__ import annotations

import pytest
from rl_fixtures import save_tiny_checkpoint

RL_OVERRIDES = [
    "train.log_every=1",
    "train.eval_every=2",
    "checkpoint.every=2",
    "data.seq_len=128",
    "data.options.builtin_n=50",
    "train.micro_batch_size=2",
    "optim.lr=1e-3",
    "plugins.rl.k=4",
    "plugins.rl.prompts_per_iter=2",
    "plugins.rl.segment_tokens=6",
    "plugins.rl.default_budget=14",
    "plugins.rl.eval_prompts=3",
    "plugins.rl.ptx_weight=0.5",
    "plugins.rl.max_version_lag=1",
    "tracking.options.system_metrics=false",
    "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 14}]",
]


def _cfg(init, run_dir, steps, extra=()):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path

    return load_config(
        config_path("rl-math"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={steps}",
            *RL_OVERRIDES,
            *extra,
        ],
    )


@pytest.mark.slow
def test_rl_runs_logs_and_resumes(tmp_path):
    from k2_rl.rl_stage import RLTrainer
    from mlflow.tracking import MlflowClient

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    seen = []
    trainer = RLTrainer(_cfg(init, tmp_path / "rl", 3), lambda s, m: seen.append((s, m)))
    out = trainer.train()
    assert out["steps"] == 3 and [s for s, _ in seen] == [1, 2, 3]
    m = seen[-1][1]
    for key in (
        "rl/reward_mean",
        "rl/reward_std",
        "rl/math/pass_rate",
        "rl/response_tokens",
        "rl/truncated_rate",
        "rl/entropy",
        "rl/log_ratio_mean",
        "qk_clip/heads_clipped",
        "rollout/tokens_per_s",
        "train/tokens_per_s",
        "time/sync_s",
        "rl/ptx_loss",
        "eval/math/pass_at_1",
    ):
        assert key in m, key
    assert trainer.engine.version == 3  # synced after every update
    # a random tiny model rambles: every response runs into the 14-token budget
    assert m["rl/truncated_rate"] > 0.5 and m["rl/reward_mean"] <= 0
    # the first update's log-ratio is that of the sampling policy itself: near 0
    assert abs(seen[0][1]["rl/log_ratio_mean"]) < 0.05
    client = MlflowClient(f"sqlite:///{tmp_path / 'rl' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(client.get_metric_history(run.info.run_id, "rl/reward_mean")) == 3
    ck = tmp_path / "rl" / "checkpoints"
    assert (ck / "step_00000002" / "tokenizer" / "k2_tokenizer.json").exists()

    again = RLTrainer(_cfg(init, tmp_path / "rl", 4))
    assert again.run.step == 3 and again.engine.version == 3
    assert again.prompts.drawn == trainer.prompts.drawn
    assert again.rollouts.state_dict() == trainer.rollouts.state_dict()
    assert again.train()["steps"] == 4


@pytest.mark.slow
def test_rl_with_the_code_reward_runs_the_sandbox(tmp_path):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path
    from k2_rl.rl_stage import RLTrainer

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    cfg = load_config(
        config_path("rl-code"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={tmp_path / 'rl'}",
            "train.steps=1",
            "checkpoint.every=1",
            "plugins.rl.k=2",
            "plugins.rl.prompts_per_iter=2",
            "plugins.rl.tasks=[{name: code, source: code, reward: code, budget: 10}]",
            "plugins.rl.critic.enabled=true",
            "tracking.tracker=null",
            "data.options.builtin_n=20",
            "data.seq_len=128",
        ],
    )
    trainer = RLTrainer(cfg)
    m = trainer.iteration()
    assert m["rl/code/response_tokens"] > 0 and "rl/code/pass_rate" in m
    assert m["rl/code/excluded"] == 0  # the sandbox ran every response
    assert "critic/checked_pairs" in m  # the closed loop ran (no pair checkable: all fail)
    assert trainer.prompts.drawn >= 2 and trainer.engine.version == 1


@pytest.mark.slow
def test_rl_carries_paused_responses_into_the_next_iteration(tmp_path):
    """Partial rollout inside `k2 rl`: a response paused at the segment limit is finished by the
    next iteration's policy, and trained on with per-token versions of both policies."""
    from k2_rl.rl_stage import RLTrainer

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    trainer = RLTrainer(
        _cfg(
            init,
            tmp_path / "rl",
            2,
            [
                "plugins.rl.segment_tokens=6",
                "plugins.rl.default_budget=12",
                "train.eval_every=0",
                "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 12}]",
            ],
        )
    )
    trained: list[list] = []
    score = trainer.score
    trainer.score = lambda groups: (trained.append(groups), score(groups))[1]
    first = trainer.iteration()
    # a random tiny model rambles to the 12-token budget: two segments per response
    assert first["rl/paused"] > 0 and trainer.rollouts.groups_in_flight() == 2
    assert all(set(t.versions) == {0} for g in trained[0] for t in g)
    second = trainer.iteration()
    assert second["rl/resumed"] > 0
    carried = [t for g in trained[1] for t in g if len(t.token_ids) > 6]
    assert carried and all(t.versions == [0] * 6 + [1] * (len(t.versions) - 6) for t in carried)
