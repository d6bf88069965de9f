"""The lm-eval `k2` model type: request scoring against the model itself, and lm-eval runs
of local task YAMLs over local data files (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_model import small_model

SMALL = small_model(experts=4)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.modelio import save_model

    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("lm") / "model")
    save_model(build_model(cfg), uri, run_config=cfg)
    return uri


@pytest.fixture(scope="module")
def lm(ckpt):
    from k2_rl.evaluation.lm_eval_adapter import K2LM

    return K2LM(path=ckpt, batch_size="4")


def _req(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def _direct(lm, context_ids, cont_ids):
    """Sum of log p(cont | context) from one plain forward of the model."""
    ids = torch.tensor([context_ids + cont_ids])
    logp = torch.log_softmax(lm.model(ids, return_logits=True).logits.float(), -1)[0]
    n = len(context_ids)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(cont_ids)))


def test_loglikelihood_matches_the_model(lm):
    tok = lm.tok
    reqs = [
        ("Problem: 12 + 30 = ?\nSolution:", " 42"),
        ("The capital of Zorvia is", " Ulm."),
        ("", "def f(x):\n    return x"),
        ("Answer: ", "7"),
    ]
    res = lm.loglikelihood([_req("loglikelihood", *r) for r in reqs])
    for (ctx, cont), (lp, greedy) in zip(reqs, res, strict=True):
        c, k = lm._pair(ctx, cont)
        assert tok.decode(c + k) == (ctx + cont if ctx else tok.decode(c) + cont)
        assert lp == pytest.approx(_direct(lm, c, k), abs=1e-3)
        assert lp < 0 and isinstance(greedy, bool)
    # the trailing space of a context moves to the continuation
    assert lm._pair("Answer: ", "7") == lm._pair("Answer:", " 7")


def test_loglikelihood_rolling_sums_every_token_once(lm):
    text = "The river flows through the old city and on to the sea."
    toks = lm.tok.encode(text)
    (whole,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    assert whole == pytest.approx(_direct(lm, [lm.tok.eos_id], toks), abs=1e-3)
    lm.max_length, saved = 5, lm.max_length
    try:  # disjoint windows of 5 tokens: each token scored once, with a shorter context
        (windowed,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    finally:
        lm.max_length = saved
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-6)


def test_generate_until_is_the_engines_greedy_text(lm):
    from k2_rl.evaluation.generate import complete

    prompts = ["Problem: 3 + 4 = ?\nSolution:\n", "Question: Who leads the Rowing Club?\nAnswer:"]
    kw = {"until": ["\n\n", "Question"], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until([_req("generate_until", p, kw) for p in prompts])
    want = complete(lm.target, prompts, max_new_tokens=10, stop=["\n\n", "Question"])
    assert got == [w[0] for w in want]
    assert all("\n\n" not in g and "Question" not in g for g in got)


def _tasks(d: Path) -> Path:
    rows = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a * b + 1)], "answer": 0}
        for a, b in [(1, 2), (3, 4), (5, 6)]
    ]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = [
        {
            "question": f"{a} + {b} = ?",
            "answer": f"Answer: {a + b}",
            "text": f"The sum of {a} and {b} is {a + b}.",
        }
        for a, b in [(1, 2), (3, 4)]
    ]
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "k2_local_mc.yaml").write_text(
        "task: k2_local_mc\n"
        + head.format(d / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
    )
    (d / "k2_local_gen.yaml").write_text(
        "task: k2_local_gen\n"
        + head.format(d / "gen.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "Problem: {{question}}\\nSolution:\\n"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (d / "k2_local_ppl.yaml").write_text(
        "task: k2_local_ppl\n"
        + head.format(d / "gen.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return d


@pytest.mark.slow
def test_simple_evaluate_runs_local_tasks_through_k2(ckpt, lm, tmp_path, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager

    d = _tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["k2_local_mc", "k2_local_gen", "k2_local_ppl"],
        task_manager=TaskManager(include_path=str(d)),
    )
    res = out["results"]
    assert 0 <= res["k2_local_mc"]["acc,none"] <= 1
    assert res["k2_local_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert res["k2_local_ppl"]["word_perplexity,none"] > 1
    # the multiple-choice accuracy is what the model's own loglikelihoods say
    rows = [json.loads(x) for x in (d / "mc.jsonl").read_text().splitlines()]
    picks = [
        max(
            range(2),
            key=lambda i, r=r: _direct(
                lm, *lm._pair(f"Question: {r['question']}\nAnswer:", " " + r["choices"][i])
            ),
        )
        for r in rows
    ]
    assert res["k2_local_mc"]["acc,none"] == pytest.approx(sum(p == 0 for p in picks) / 3)


@pytest.mark.slow
def test_lm_eval_command_line_with_model_k2(ckpt, tmp_path):
    d = _tasks(tmp_path)
    k2 = str(Path(sys.executable).parent / "k2")
    proc = subprocess.run(
        [
            k2,
            "lm-eval",
            "--model",
            "k2",
            "--model_args",
            f"path={ckpt}",
            "--tasks",
            "k2_local_mc",
            "--include_path",
            str(d),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **OFFLINE},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k2_local_mc" in proc.stdout and "acc" in proc.stdout
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(result.read_text())["results"]["k2_local_mc"]
