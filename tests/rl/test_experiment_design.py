"""`k2 experiment`: the FLOPs count, the sparsity summary, and every experiment end to end at a
toy scale (tracked arms nested under one parent run, a PNG and a report)."""

from __future__ import annotations

import pytest
from small_model import small_model

# A much smaller model than the experiments' own, so that each arm takes seconds.
SMALL = [
    *small_model(layers=None, experts=None),
    "train.micro_batch_size=1",
    "train.eval_batches=1",
]


def test_flops_count_reproduces_the_reports_head_figure():
    from k2_core.configio import load_config
    from k2_rl.experiments.flops import forward_flops_per_token, train_flops_per_token

    k2 = load_config("k2-1t")
    more = k2.model.model_copy(update={"num_attention_heads": 128})
    added = forward_flops_per_token(more, k2.moe, 131072) / forward_flops_per_token(
        k2.model, k2.moe, 131072
    )
    assert added - 1 == pytest.approx(0.83, abs=0.05)  # the K2 report: +83% at 128K
    # active matmul parameters x 2 at zero context, plus nothing else
    from k2_core.params import count_parameters

    c = count_parameters(k2.model, k2.moe)
    matmul = (
        c["active"]
        - c["embedding"]
        - c["norms"]
        - k2.model.num_hidden_layers * (k2.model.kv_lora_rank + (k2.model.q_lora_rank or 0))
    )  # latent norms are not matmuls
    assert forward_flops_per_token(k2.model, k2.moe, 0) == 2 * matmul
    assert train_flops_per_token(k2.model, k2.moe, 4095) == 3 * forward_flops_per_token(
        k2.model, k2.moe, 2048
    )


def test_sparsity_arms_have_equal_flops_up_to_the_router():
    from k2_core.configio import load_config
    from k2_rl.experiments.flops import train_flops_per_token

    f = {
        e: train_flops_per_token(c.model, c.moe, 256)
        for e in (8, 48)
        for c in [load_config("tiny", ["moe.num_experts_per_tok=1", f"moe.n_routed_experts={e}"])]
    }
    router = 3 * 2 * 256 * 40 * 3  # 3x, 2 FLOPs, hidden, 40 more experts, 3 MoE layers
    assert f[48] - f[8] == router


def test_first_reach_and_the_sparsity_summary():
    from k2_rl.experiments.common import first_reach
    from k2_rl.experiments.sparsity import summarize_sparsity

    assert first_reach([1, 2, 3], [5.0, 4.0, 3.0], 3.5) == pytest.approx(2.5)
    assert first_reach([1, 2, 3], [5.0, 3.0, 4.0], 3.5) == pytest.approx(1.5 + 0.25)
    assert first_reach([1, 2], [5.0, 4.0], 3.0) is None
    rows = {
        "experts=8": {
            "sparsity": 8,
            "flops": [1.0, 2.0, 3.0, 4.0],
            "eval_loss": [5.0, 4.5, 4.2, 4.0],
            "best_eval_loss": 4.0,
        },
        "experts=48": {
            "sparsity": 48,
            "flops": [1.0, 2.0, 3.0, 4.0],
            "eval_loss": [4.8, 4.0, 3.7, 3.5],
            "best_eval_loss": 3.5,
        },
    }
    s = summarize_sparsity(rows)
    assert s["common_loss"] == 4.0
    assert s["flops_to_common_loss"] == {"experts=8": 4.0, "experts=48": 2.0}
    assert s["most_sparse_advantage"] == {"experts=8": 2.0}
    assert s["ratio_vs_least_sparse"]["experts=48"] == 2.0


def test_unknown_experiment_is_one_line(capsys):
    from k2_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["experiment", "nope"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    from k2_core.errors import ConfigError
    from k2_rl.experiments import run_experiment

    with pytest.raises(ConfigError, match="scale must be > 0"):
        run_experiment("heads", "unused", scale=0)


def test_k2_study_is_a_deprecated_alias_of_k2_experiment(monkeypatch, capsys, tmp_path):
    """`k2 study NAME` prints one deprecation line and runs `k2 experiment NAME` (through the
    command registry: k2-core does not import k2-rl)."""
    import k2_rl.experiments
    from k2_core.cli import main

    seen = {}

    def fake(name, out_dir, config, overrides, scale=1.0, num_threads=None, **kwargs):
        seen.update(name=name, out=out_dir, config=config, overrides=overrides, scale=scale)
        return {
            "seconds": 0.0,
            "report": "r.md",
            "png": "p.png",
            "tracking_uri": "u",
            "mlflow_experiment": "study-qk_clip",
        }

    monkeypatch.setattr(k2_rl.experiments, "run_experiment", fake)
    assert (
        main(
            [
                "study",
                "qk_clip",
                "train.steps=3",
                "optim.lr=0.1",
                "--scale",
                "0.5",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert (
        out.err.count("\n") == 1 and "deprecated" in out.err and "k2 experiment qk_clip" in out.err
    )
    assert out.out.startswith("k2 experiment qk_clip:")
    assert seen == {
        "name": "qk_clip",
        "out": str(tmp_path),
        "config": "tiny",
        "overrides": ["train.steps=3", "optim.lr=0.1"],
        "scale": 0.5,
    }


def _runs(result):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result["tracking_uri"])
    exp = client.get_experiment_by_name(result["mlflow_experiment"])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs.pop(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    for r in runs.values():
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {f"{result['experiment']}.png", "report.md"} <= artifacts
    with open(result["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return client, parent, runs, open(result["report"]).read()


@pytest.mark.slow
def test_sparsity_experiment(tmp_path, monkeypatch):
    from k2_rl.experiments import run_experiment
    from k2_rl.experiments.sparsity import STEPS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = run_experiment(
        "sparsity",
        str(tmp_path),
        overrides=SMALL,
        scale=0.03,
        experts=(4, 8),
        echo=None,
        num_threads=1,
    )
    assert r["steps"] == round(STEPS * 0.03) and set(r["arms"]) == {"experts=4", "experts=8"}
    client, parent, runs, report = _runs(r)
    assert {
        runs[a["mlflow_run_id"]].data.params["moe.n_routed_experts"] for a in r["arms"].values()
    } == {"4", "8"}
    assert {a["top_k"] for a in r["arms"].values()} == {1}
    common = r["common_loss"]
    assert common == max(a["best_eval_loss"] for a in r["arms"].values())
    assert all(f is not None and f > 0 for f in r["flops_to_common_loss"].values())
    assert f"{common:.3f}" in report and "1.69x / 1.39x / 1.15x" in report
    assert parent.data.metrics["common_loss"] == pytest.approx(common)


@pytest.mark.slow
def test_heads_experiment(tmp_path, monkeypatch):
    from k2_rl.experiments import run_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = run_experiment(
        "heads", str(tmp_path), overrides=SMALL, scale=0.02, echo=None, num_threads=1
    )
    assert set(r["arms"]) == {"heads=2", "heads=4"}
    _, parent, runs, report = _runs(r)
    assert len(runs) == 2
    one, two = r["arms"]["heads=2"], r["arms"]["heads=4"]
    assert r["loss_gain_pct"] == pytest.approx(
        100 * (one["final_eval_loss"] - two["final_eval_loss"]) / one["final_eval_loss"]
    )
    added = r["flops_added"]
    assert 0 < added["256"]["added_pct"] < added["131072"]["added_pct"] < 100
    assert f"{r['loss_gain_pct']:+.2f}%" in report and "+83%" in report


@pytest.mark.slow
def test_rephrase_experiment_with_world_renderings(tmp_path, monkeypatch):
    from k2_rl.experiments import run_experiment
    from k2_rl.experiments.rephrase import ARMS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = run_experiment(
        "rephrase",
        str(tmp_path),
        overrides=[*SMALL, "train.micro_batch_size=4"],
        scale=0.1,
        qa_limit=8,
        echo=None,
        num_threads=1,
    )
    assert r["people"] == 20 and "alternative renderings" in r["rephrasings"]
    client, parent, runs, report = _runs(r)
    assert set(r["arms"]) == set(ARMS) and len(runs) == 3
    for a in r["arms"].values():
        assert a["questions"] == 8 and 0 <= a["exact_match"] <= 1 and a["answer_nll"] > 0
        run = runs[a["mlflow_run_id"]]  # knowledge_qa is logged into each arm's own run
        assert run.data.metrics["eval/knowledge_qa/exact_match"] == a["exact_match"]
    # equal compute: 10 epochs of the raw data; the ten renderings are seen about once
    assert r["arms"]["raw x10"]["epochs_seen"] == pytest.approx(10, rel=0.1)
    assert r["arms"]["10 rephrasings x1"]["epochs_seen"] < 2
    assert "world generator's alternative renderings" in report


@pytest.mark.slow
def test_qk_clip_runs_under_k2_experiment(tmp_path, monkeypatch):
    from k2_rl.experiments import run_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = [
        *small_model(layers=None, experts=4),
        "train.micro_batch_size=1",
        "train.eval_batches=1",
    ]
    r = run_experiment(
        "qk_clip", str(tmp_path), overrides=small, scale=0.01, echo=None, num_threads=1
    )
    assert r["experiment"] == "qk_clip" and r["mlflow_experiment"] == "study-qk_clip"
    assert set(r["arms"]) == {"muon", "muonclip"}
    _runs(r)


def test_rephrasings_from_k2_rephrase_through_an_endpoint(httpserver, tmp_path):
    """`generator=`: the rewrites come from `k2 rephrase` against a real local HTTP endpoint
    (a fake model that reverses the passage's sentences)."""
    import json
    import re

    from k2_data.corpus import World
    from k2_rl.experiments.rephrase import generator_rephrasings
    from werkzeug import Response

    def reverse(text):
        return " ".join(reversed(re.split(r"(?<=[.!?])\s+", text.strip())))

    def handle(request):
        if request.path.endswith("/models"):
            body = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
        else:
            user = request.get_json()["messages"][-1]["content"]
            passage = re.search(r"<passage>\n(.*?)\n</passage>", user, re.S).group(1)
            body = {
                "id": "c",
                "object": "chat.completion",
                "model": "fake",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": reverse(passage)},
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            }
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request(re.compile(".*")).respond_with_handler(handle)
    docs = [(d.id, d.text) for d in World.generate(3, n_people=20).documents()[-4:]]
    out, counts = generator_rephrasings(docs, 10, httpserver.url_for("/v1"), tmp_path)
    assert counts == {"accepted": 40, "raw_fallback": 0}  # 10 = 8 styles, then 2 more
    assert len(out) == 10
    for rephrasing in out:
        assert [t for _, t in rephrasing] == [reverse(t) for _, t in docs]
        assert len({i for i, _ in rephrasing}) == 4
