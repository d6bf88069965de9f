"""The studies end to end at a toy scale: tracked runs in one experiment, PNG and report."""

from __future__ import annotations

import pytest
from k2_core.errors import ConfigError
from k2_core.studies import run_study
from small_model import small_model

# A much smaller model than the studies' own, so each run takes a second or two.
SMALL = [*small_model(layers=None, experts=4), "train.micro_batch_size=1", "train.eval_batches=1"]
SCALE = 0.02  # qk_clip: 6 steps, muon_vs_adamw: 4 steps


def _runs(result):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result["tracking_uri"])
    exp = client.get_experiment_by_name(result["experiment"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    return client, {r.info.run_id: r for r in runs}


def _check_files(result):
    png = result["png"]
    assert png is not None
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return open(result["report"]).read()


@pytest.mark.slow
def test_qk_clip_study(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_study("qk_clip", str(tmp_path / "qk"), scale=SCALE, overrides=SMALL, echo=None)
    assert result["steps"] == 6
    arms = result["arms"]
    assert set(arms) == {"muon", "muonclip"}
    client, runs = _runs(result)
    parent = runs.pop(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert len(runs) == 2
    for label, stats in arms.items():
        run = runs[stats["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["optim.name"] == label
        history = client.get_metric_history(run.info.run_id, "attn/max_logit")
        assert len(history) >= 2 and max(m.value for m in history) == pytest.approx(
            stats["peak_max_logit"]
        )
        assert "eval/loss" in run.data.metrics
    assert (
        runs[arms["muonclip"]["mlflow_run_id"]].data.params["optim.options.qk_clip_tau"] == "20.0"
    )
    report = _check_files(result)
    for stats in arms.values():
        assert f"{stats['peak_max_logit']:.1f}" in report
        assert f"{stats['final_eval_loss']:.3f}" in report
        assert f"{stats['final_train_loss']:.3f}" in report
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"qk_clip.png", "report.md"} <= artifacts


@pytest.mark.slow
def test_muon_vs_adamw_study(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_study(
        "muon_vs_adamw",
        str(tmp_path / "mva"),
        scale=SCALE,
        overrides=SMALL,
        muon_lrs=(3e-3,),
        adamw_lrs=(1e-3,),
        echo=None,
    )
    arms = result["arms"]
    assert set(arms) == {"muonclip lr=0.003", "adamw lr=0.001"}
    assert result["best"] == {"muonclip": "muonclip lr=0.003", "adamw": "adamw lr=0.001"}
    client, runs = _runs(result)
    runs.pop(result["parent_run_id"])
    assert {runs[s["mlflow_run_id"]].data.params["optim.name"] for s in arms.values()} == {
        "muonclip",
        "adamw",
    }
    assert {runs[s["mlflow_run_id"]].data.params["optim.lr"] for s in arms.values()} == {
        "0.003",
        "0.001",
    }
    # equal tokens: same steps and batch for both
    assert {runs[s["mlflow_run_id"]].data.params["train.steps"] for s in arms.values()} == {"4"}
    report = _check_files(result)
    for stats in arms.values():
        assert f"{stats['final_eval_loss']:.3f}" in report
        evals = client.get_metric_history(stats["mlflow_run_id"], "eval/loss")
        assert len(evals) >= 2


def test_unknown_study(tmp_path):
    with pytest.raises(ConfigError, match="no study named"):
        run_study("nope", str(tmp_path))


def test_k2_study_alias_without_k2_experiment(monkeypatch, capsys, tmp_path):
    """With no `k2 experiment` installed (no k2-rl), the deprecated `k2 study` still runs the
    study itself, after its one warning line."""
    import k2_core.studies
    from k2_core.cli import main

    monkeypatch.setenv("K2_LOAD_PLUGINS", "optim,moe,data")
    seen = {}

    def fake(name, out_dir, scale=1.0, overrides=None, num_threads=None, **kwargs):
        seen.update(name=name, out=out_dir, scale=scale, overrides=overrides)
        return {
            "seconds": 0.0,
            "report": "r.md",
            "png": "p.png",
            "tracking_uri": "u",
            "experiment": "study-qk_clip",
        }

    monkeypatch.setattr(k2_core.studies, "run_study", fake)
    assert main(["study", "qk_clip", "train.steps=3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and "deprecated" in out.err
    assert out.out.startswith("k2 study qk_clip:")  # run here, not through `k2 experiment`
    assert seen == {
        "name": "qk_clip",
        "out": str(tmp_path),
        "scale": 1.0,
        "overrides": ["train.steps=3"],
    }
