"""The training loop through real slots: a toy dataset plugin, AdamW, mlflow, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from k2_core.configio import load_config
from k2_core.orchestrator import TrainingError, build_run, train
from k2_core.plugins import load_plugins
from k2_core.trainstate import list_checkpoints
from toy_run import BASE, ToyPlugin, make


def test_loss_falls_and_metrics_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    run = make(tmp_path, "train.steps=20", "checkpoint.every=10")
    summary = train(run)
    assert summary["steps"] == 20 and summary["last_loss"] < summary["first_loss"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    r = client.get_run(summary["tracking_run_id"])
    assert r.info.status == "FINISHED"
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "attn/max_logit",
        "attn/max_logit/layer_1",
        "qk_clip/heads_clipped",
        "moe/load_imbalance",
        "moe/load_imbalance/layer_1",
        "eval/loss",
    ):
        assert key in r.data.metrics, key
    assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 20
    assert r.data.params["model.hidden_size"] == "64" and "plugin.k2-core" in r.data.params
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run" / "checkpoints"))] == [10, 20]


def test_resume_is_bit_exact(tmp_path):
    straight = make(tmp_path / "a", "train.steps=8", "checkpoint.every=4", "tracking.tracker=null")
    train(straight)
    half = make(tmp_path / "b", "train.steps=4", "checkpoint.every=4", "tracking.tracker=null")
    train(half)
    resumed = make(tmp_path / "b", "train.steps=8", "checkpoint.every=4", "tracking.tracker=null")
    assert resumed.step == 4
    train(resumed)
    a = [h["train/loss"] for h in straight.history]
    b = [h["train/loss"] for h in half.history] + [h["train/loss"] for h in resumed.history]
    assert a == b
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    plugin = ToyPlugin()
    plugin.poison_steps = {3}
    run = make(
        tmp_path,
        "train.steps=6",
        "model.dense_ffn=nan_swiglu",
        "model.first_k_dense_replace=1",
        "tracking.tracker=null",
        plugin=plugin,
    )
    summary = train(run)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert all(math.isfinite(h["train/loss"]) for h in run.history)

    plugin = ToyPlugin()
    plugin.poison_steps = set(range(2, 100))
    run = make(
        tmp_path / "x",
        "train.steps=10",
        "model.dense_ffn=nan_swiglu",
        "train.max_bad_steps=3",
        "tracking.tracker=null",
        "checkpoint.every=1",
        plugin=plugin,
    )
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 2"):
        train(run)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "x" / "run" / "checkpoints"))] == [1, 2]


def test_unreachable_tracking_store_never_stops_training(tmp_path, capsys):
    run = make(tmp_path, "train.steps=3", "tracking.tracking_uri=http://127.0.0.1:9")
    summary = train(run)
    assert summary["steps"] == 3
    pending = (tmp_path / "run" / "pending_metrics.jsonl").read_text().splitlines()
    assert len(pending) == 3
    assert "unreachable" in capsys.readouterr().err


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import k2_core.checkpoint as ck
    from k2_core.orchestrator import save_checkpoint
    from k2_core.trainstate import load_train_state

    run = make(tmp_path, "train.steps=2", "checkpoint.every=1", "tracking.tracker=null")
    train(run)
    root = str(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in list_checkpoints(root)] == [1, 2]

    def dying_json_dump(*a, **k):  # the process "dies" before the commit marker is written
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.json, "dump", dying_json_dump)
    run.step = 3
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run)
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "step_00000003.tmp").exists()
    found = list_checkpoints(root)
    assert [s for s, _ in found] == [1, 2]
    fresh = make(tmp_path, "train.steps=2", "tracking.tracker=null")
    assert fresh.step == 2  # resume=auto picked the newest complete checkpoint
    assert load_train_state(found[-1][1], model=fresh.model)["step"] == 2


@pytest.mark.parametrize("where", ["file", "proc"])
def test_a_bad_checkpoint_dir_fails_in_one_line_before_the_model_is_built(
    tmp_path, where, monkeypatch
):
    from k2_core.errors import CheckpointError
    from k2_core.model import decoder

    target = tmp_path / "a_file"
    target.write_text("x")
    bad = str(target) if where == "file" else "/proc/k2_runs"
    built = []
    monkeypatch.setattr(decoder, "K2ForCausalLM", lambda *a, **k: built.append(1))
    pl = load_plugins(extra=[("toy", ToyPlugin())])
    cfg = load_config("tiny", [*BASE, f"checkpoint.dir={bad}"], registry=pl.registry)
    with pytest.raises(CheckpointError) as e:
        build_run(cfg, pl)
    assert "\n" not in str(e.value) and bad in str(e.value)
    assert not built
