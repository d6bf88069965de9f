"""`k2 eval`: the built-in tasks on a tiny checkpoint, their scoring, mlflow logging, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from small_model import small_model

# A much smaller model than `tiny` (same vocabulary: the built-in corpus' tokenizer).
SMALL = small_model(experts=4)
FAST = [
    "arithmetic.max_new_tokens=24",
    "arithmetic.k=2",
    "code.max_new_tokens=24",
    "knowledge_qa.max_new_tokens=6",
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A freshly initialised SMALL model saved with its run config (no training run)."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.modelio import save_model

    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    uri = str(tmp_path_factory.mktemp("ckpt") / "model")
    save_model(model, uri, run_config=cfg)
    return uri


@pytest.fixture(scope="module")
def target(saved_model):
    from k2_rl.evaluation.target import load_target

    return load_target(saved_model)


def test_pass_at_k_matches_enumeration():
    from k2_rl.evaluation.tasks import pass_at_k

    for n, c, k in [(4, 0, 2), (4, 1, 1), (5, 2, 3), (6, 3, 2), (3, 3, 2), (8, 1, 8)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        want = sum(any(d) for d in draws) / len(draws)
        assert pass_at_k(n, c, k) == pytest.approx(want)


def test_exercise_references_pass_and_wrong_bodies_fail_in_the_sandbox():
    from k2_rl.evaluation.exercises import cut_body, generate_exercises
    from k2_rl.evaluation.sandboxed import run_programs

    ex = generate_exercises(12, seed=3)
    assert len({e.name for e in ex}) == 12 and len({e.id.split("/")[0] for e in ex}) == 12
    assert generate_exercises(12, seed=3) == ex and generate_exercises(12, seed=4) != ex
    assert run_programs(ex, [e.reference for e in ex]) == [True] * 12
    assert run_programs(ex[:4], ["    return None"] * 4) == [False] * 4
    # a base model writes on past the body: only the body is kept
    assert cut_body("    return x\n\ndef other():\n    pass") == "    return x"
    assert cut_body("    y = 1\n    return y\n") == "    y = 1\n    return y"


def test_knowledge_questions_are_held_out_entities_and_phrasings():
    from k2_data.corpus import STYLES, World
    from k2_rl.evaluation.tasks import _relation, pick_questions

    world = World.generate(7, n_people=30)
    demos, questions = pick_questions(world, None, 3)
    train_ids = {q.fact_id for q in world.questions("train")}
    assert len(demos) == 3 and {d.fact_id for d in demos} <= train_ids
    assert len({_relation(d.fact_id) for d in demos}) == 3
    assert questions and not {q.fact_id for q in questions} & train_ids
    texts = [d.text for s in STYLES for d in world.documents(s)]
    stems = {q.question.split(world.by_id[q.fact_id.rsplit(".", 1)[0]].name)[0] for q in questions}
    for stem in stems:  # the wording before the name never occurs in a document
        assert not any(stem in t for t in texts), stem
    assert len({q.fact_id.split("/")[0] for q in questions[:20]}) > 1  # kinds are mixed


class _Oracle:
    """Stands in for the engine below the knowledge_qa scoring: answers from a table."""

    max_batch_size = 16

    def __init__(self, tokenizer, answers):
        self.tok, self.answers = tokenizer, answers

    def generate(self, prompts, params):
        from k2_data.inference.engine import Completion

        out = []
        for p in prompts:
            question = self.tok.decode(p).rsplit("Question: ", 1)[1].split("\n")[0]
            out.append(Completion(p, [], [], "stop", text=f" {self.answers[question]}\nQuestion"))
        return out


def test_knowledge_qa_exact_match_of_right_and_wrong_answers(target):
    from k2_data.corpus import World
    from k2_rl.evaluation.options import KnowledgeQAOptions
    from k2_rl.evaluation.target import EvalTarget
    from k2_rl.evaluation.tasks import knowledge_qa

    world = World.generate(5, n_people=20)
    gold = {q.question: q.answer for q in world.questions("all")}
    opts = KnowledgeQAOptions(n=12)
    right = EvalTarget("x", target.model, target.tokenizer, _engine=_Oracle(target.tokenizer, gold))
    m = knowledge_qa(right, opts, None, world=world)
    assert m["exact_match"] == 1.0 and m["questions"] == 12
    assert m["answer_nll"] > 0 and 0 <= m["majority_baseline"] < 1
    shifted = dict(zip(gold, list(gold.values())[1:] + list(gold.values())[:1], strict=True))
    wrong = EvalTarget(
        "x", target.model, target.tokenizer, _engine=_Oracle(target.tokenizer, shifted)
    )
    assert knowledge_qa(wrong, opts, 5, world=world)["exact_match"] < 1.0


def test_perplexity_is_the_token_mean_of_the_model_loss(target):
    from k2_core.orchestrator import evaluate
    from k2_data.loader import PackedDataset, PackedOptions
    from k2_rl.evaluation.options import PerplexityOptions
    from k2_rl.evaluation.tasks import perplexity

    m = perplexity(target, PerplexityOptions(batch_size=4), 8)
    assert m["sequences"] == 8 and m["tokens"] == 8 * 256
    loader = PackedDataset(
        PackedOptions(uri=target.data_uri, split="val", batch_size=4, shuffle=False, prefetch=0)
    )
    want = evaluate(target.model, loader, 2)  # equal-size batches: mean of means = token mean
    loader.close()
    assert m["loss"] == pytest.approx(want, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


@pytest.mark.slow
def test_run_eval_every_task_logs_to_mlflow(saved_model, target, tmp_path):
    from k2_rl.evaluation.runner import eval_options, format_table, run_eval
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_eval(
        saved_model, ["all"], options=eval_options(FAST), limit=2, target=target, tracking_uri=uri
    )
    t = r["tasks"]
    assert set(t) == {"perplexity", "arithmetic", "knowledge_qa", "code"}
    assert t["perplexity"]["sequences"] == 2 and t["perplexity"]["loss"] > 0
    assert set(t["arithmetic"]) == {"pass_at_1", "pass_at_2", "sample_accuracy", "problems"}
    assert t["knowledge_qa"]["questions"] == 2 and t["code"]["exercises"] == 2
    for task in t.values():
        assert all(math.isfinite(v) for v in task.values())
    tr = r["tracking"]
    assert tr["attached_to_training_run"] is False
    run = MlflowClient(uri).get_run(tr["run_id"])
    assert run.data.metrics["eval/perplexity/loss"] == pytest.approx(t["perplexity"]["loss"])
    assert run.data.metrics["eval/code/pass_at_1"] == t["code"]["pass_at_1"]
    table = format_table(r)
    assert "knowledge_qa  exact_match" in table and "perplexity    loss" in table


@pytest.mark.slow
def test_eval_attaches_to_the_checkpoints_training_run(tmp_path, monkeypatch):
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run, train
    from k2_rl.evaluation.runner import eval_options, run_eval
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    cfg = load_config(
        "tiny",
        [
            *SMALL,
            "train.steps=2",
            "train.micro_batch_size=1",
            "train.eval_every=0",
            "checkpoint.every=2",
            "checkpoint.resume=never",
            f"checkpoint.dir={run_dir}",
            "tracking.options.system_metrics=false",
        ],
    )
    summary = train(build_run(cfg))
    ckpt = str(run_dir / "checkpoints" / "step_00000002")
    r = run_eval(ckpt, ["perplexity"], options=eval_options(), limit=2)
    assert r["tracking"]["attached_to_training_run"] is True
    assert r["tracking"]["run_id"] == summary["tracking_run_id"]
    hist = MlflowClient(r["tracking"]["tracking_uri"]).get_metric_history(
        summary["tracking_run_id"], "eval/perplexity/loss"
    )
    assert [(h.step, h.value) for h in hist] == [
        (2, pytest.approx(r["tasks"]["perplexity"]["loss"]))
    ]


def test_cli_json_and_one_line_errors(saved_model, capsys):
    from k2_core.cli import main

    assert (
        main(
            [
                "eval",
                saved_model,
                "perplexity.batch_size=2",
                "--tasks",
                "perplexity",
                "--limit",
                "2",
                "--json",
                "--no-track",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["perplexity"]["sequences"] == 2 and out["tracking"] is None
    assert main(["eval", saved_model, "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", saved_model, "arithmetic.kk=3"]) == 2
    assert "arithmetic.kk: unknown key" in capsys.readouterr().err
