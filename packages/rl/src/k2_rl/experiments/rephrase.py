"""`k2 experiment rephrase`: rephrasing instead of repeating knowledge documents (the K2
report, SimpleQA: raw text 10 epochs 23.76; one rephrasing 10 epochs 27.39; ten rephrasings
1 epoch 28.94).

A generated knowledge world (its own seed, `PEOPLE x scale` people) is trained on in three arms
at equal compute (the steps of 10 epochs of the raw arm's data, same seed and model):

- `raw x10`: the world's encyclopedic documents, 10 epochs;
- `1 rephrasing x10`: one other rendering of the same facts, trained as long;
- `10 rephrasings x1`: ten different renderings, about one pass each.

Every arm also trains on the same question/answer pairs about half of the entities (train
phrasings), so that the model learns to answer; `knowledge_qa` then asks about the other half,
in phrasings that appear nowhere in training: only knowledge the model took from the documents
can answer. The rephrasings come from `k2 rephrase` when a generator endpoint is given
(`generator=`), otherwise from the world generator's alternative renderings (other styles and
template draws of the same facts); the report says which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2_core.harness import (
    Arm,
    ParentRun,
    conclude,
    fmt,
    run_arms,
    save_plot,
    series,
    tracking_uri,
)

from .common import (
    EXPERIMENT_MODEL,
    arm_dir,
    base_overrides,
    experiment_name,
    final_checkpoint,
)

PEOPLE = 160
WORLD_SEED = 1234  # not the built-in corpus' world (seed 0): nothing here was seen before
EPOCHS = 10
# The alternative renderings, in order: the first is the "1 rephrasing" arm's, all ten the
# "10 rephrasings" arm's. The raw text is ("encyclopedic", 0).
RENDERINGS: tuple[tuple[str, int], ...] = (
    ("narrative", 0),
    ("encyclopedic", 1),
    ("infobox", 1),
    ("narrative", 1),
    ("encyclopedic", 2),
    ("infobox", 2),
    ("narrative", 2),
    ("encyclopedic", 3),
    ("infobox", 3),
    ("narrative", 3),
)
ARMS = ("raw x10", "1 rephrasing x10", "10 rephrasings x1")


def qa_text(question: str, answer: str) -> str:
    """A question/answer training document, in knowledge_qa's prompt format."""
    return f"Question: {question}\nAnswer: {answer}"


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, t in rows:
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return str(path)


def world_renderings(world: Any, n: int) -> list[list[tuple[str, str]]]:
    """The raw documents and `n` alternative renderings, as (id, text) lists."""
    styles = [("encyclopedic", 0), *RENDERINGS[:n]]
    return [[(d.id, d.text) for d in world.documents(s, v)] for s, v in styles]


def generator_rephrasings(
    docs: list[tuple[str, str]], n: int, generator: str, work: Path
) -> tuple[list[list[tuple[str, str]]], dict[str, int]]:
    """`n` rephrasings of `docs` by `k2 rephrase` through the OpenAI-compatible endpoint
    `generator` (rounds of up to one rewrite per style, each round its own seed). A document
    whose k-th rewrite was rejected (e.g. unfaithful) keeps its raw text in that slot; the
    counts of accepted and fallen-back rewrites are returned with them."""
    import fsspec
    from k2_data.config import SourceConfig
    from k2_data.pipeline.options import GeneratorSpec, PipelineOptions
    from k2_data.rephrase import RephraseConfig, run_rephrase
    from k2_data.rephrase.styles import DEFAULT_REPHRASE

    src = _write_jsonl(work / "source.jsonl", docs)
    got: dict[str, list[str]] = {i: [] for i, _ in docs}
    k = 0
    while k < n:
        m = min(len(DEFAULT_REPHRASE), n - k)
        cfg = RephraseConfig(
            source=SourceConfig(kind="files", uri=src, format="jsonl", domain="knowledge"),
            n_rephrasings=m,
            seed=k,
            generator=GeneratorSpec(name="openai", options={"base_url": generator}),
            pipeline=PipelineOptions(out=str(work / f"round{k}"), tracking=False, progress=False),
        )
        run_rephrase(cfg)
        for f in sorted(fsspec.open_files(str(work / f"round{k}" / "data" / "*.jsonl"))):
            with f as fh:
                for line in fh.read().decode().splitlines():
                    rec = json.loads(line)
                    if rec["source_id"] in got:
                        got[rec["source_id"]].append(rec["text"])
        k += m
    out = [
        [(f"{i}/rephrase{j}", got[i][j] if j < len(got[i]) else t) for i, t in docs]
        for j in range(n)
    ]
    accepted = sum(min(len(v), n) for v in got.values())
    return out, {"accepted": accepted, "raw_fallback": n * len(docs) - accepted}


def _prepare(
    out: Path,
    name: str,
    docs: list[tuple[str, str]],
    qa: list[tuple[str, str]],
    qa_copies: int,
    tokenizer: str,
    seq_len: int,
) -> tuple[str, dict[str, Any]]:
    """Pack one arm's documents and QA pairs (QA repeated `qa_copies` times) into a dataset."""
    from k2_data.config import DataPrepareConfig, SourceConfig, TokenizerConfig
    from k2_data.prepare import prepare, read_manifest

    d = out / "data" / name
    cfg = DataPrepareConfig(
        sources=[
            SourceConfig(
                kind="files",
                uri=_write_jsonl(d / "src" / "docs.jsonl", docs),
                format="jsonl",
                domain="knowledge",
            ),
            SourceConfig(
                kind="files",
                uri=_write_jsonl(d / "src" / "qa.jsonl", qa),
                format="jsonl",
                domain="qa",
            ),
        ],
        weights={"qa": float(qa_copies)},
        tokenizer=TokenizerConfig(name="bpe", options={"path": tokenizer}),
        seq_len=seq_len,
        val_fraction=0.0,
        workers=0,
        out=str(d / "packed"),
    )
    uri = prepare(cfg)
    return uri, read_manifest(uri)


def rephrase_experiment(
    out: Path,
    scale: float,
    overrides: list[str],
    preset: str = "tiny",
    generator: str | None = None,
    tokenizer: str | None = None,
    qa_limit: int | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Raw x10 vs 1 rephrasing x10 vs 10 rephrasings x1 at equal compute, by knowledge_qa."""
    from k2_core.configio import load_config
    from k2_data.corpus import World

    from ..evaluation.options import EvalOptions, KnowledgeQAOptions
    from ..evaluation.runner import run_eval

    people = max(20, round(PEOPLE * scale))
    world = World.generate(WORLD_SEED, n_people=people)
    uri = tracking_uri(out, overrides)
    probe = load_config(preset, [*EXPERIMENT_MODEL, *overrides])
    if tokenizer is None:
        from k2_data.prepare import default_dataset_uri

        tokenizer = f"{default_dataset_uri()}/tokenizer"
    raw = world_renderings(world, 0)[0]
    if generator:
        rephrased, counts = generator_rephrasings(raw, len(RENDERINGS), generator, out / "rephrase")
        source = (
            f"`k2 rephrase` through {generator} ({counts['accepted']} rewrites accepted, "
            f"{counts['raw_fallback']} rejected and replaced by the raw text)"
        )
    else:
        rephrased = world_renderings(world, len(RENDERINGS))[1:]
        source = "the world generator's alternative renderings: " + ", ".join(
            f"{s} #{v}" for s, v in RENDERINGS
        )
    qa = [(f"qa/{q.fact_id}", qa_text(q.question, q.answer)) for q in world.questions("train")]
    seq_len = probe.data.seq_len
    data = {
        ARMS[0]: _prepare(out, "raw", raw, qa, 1, tokenizer, seq_len),
        ARMS[1]: _prepare(out, "rephrase1", rephrased[0], qa, 1, tokenizer, seq_len),
        ARMS[2]: _prepare(
            out, "rephrase10", [d for r in rephrased for d in r], qa, EPOCHS, tokenizer, seq_len
        ),
    }
    batch = probe.train.micro_batch_size * probe.train.grad_accum
    raw_rows = data[ARMS[0]][1]["splits"]["train"]["n_sequences"]
    steps = max(2, math.ceil(EPOCHS * raw_rows / batch))
    base = [*base_overrides("rephrase", steps, uri), "train.eval_every=0", *overrides]
    arms = [
        Arm(
            a,
            [
                *base,
                f"data.options.uri={data[a][0]}",
                f"data.seq_len={seq_len}",
                f"name=rephrase-{a.replace(' ', '_')}",
                f"checkpoint.dir={arm_dir(out, a)}",
            ],
        )
        for a in ARMS
    ]
    parent = ParentRun(
        uri,
        experiment_name("rephrase"),
        out,
        "rephrase",
        {
            "scale": scale,
            "steps": steps,
            "people": people,
            "world_seed": WORLD_SEED,
            "preset": preset,
            "rephrasings": source,
            "overrides": " ".join(overrides),
        },
    )
    status, rows = "FAILED", {}
    try:
        run_arms(arms, parent, preset, echo)
        qa_opts = KnowledgeQAOptions(n=qa_limit, world_seed=WORLD_SEED, world_people=people)
        for a in arms:
            m = data[a.label][1]
            ev = run_eval(
                final_checkpoint(a, out, steps),
                ["knowledge_qa"],
                limit=qa_limit,
                tokenizer=tokenizer,
                data=data[a.label][0],
                tracking_uri=uri,
                world=world,
                options=EvalOptions(knowledge_qa=qa_opts),
            )
            rows[a.label] = {
                **ev["tasks"]["knowledge_qa"],
                "train_tokens_per_epoch": m["splits"]["train"]["n_tokens"],
                "epochs_seen": steps * batch / m["splits"]["train"]["n_sequences"],
                "final_train_loss": (series(a, "train/loss")[1] or [None])[-1],
                "seconds": round(a.seconds, 1),
                "mlflow_run_id": a.summary.get("tracking_run_id"),
            }
            if echo:
                echo(
                    f"  [{a.label}] knowledge_qa exact match {rows[a.label]['exact_match']:.3f}, "
                    f"answer NLL {rows[a.label]['answer_nll']:.3f}"
                )
        status = "FINISHED"
    finally:
        metrics = {
            f"{k.replace(' ', '_')}/{x}": float(v)
            for k, r in rows.items()
            for x, v in r.items()
            if isinstance(v, int | float)
        }
        png, report = conclude(
            out,
            parent,
            status,
            metrics,
            plot=lambda: _plot(out / "rephrase.png", arms, rows),
            report=lambda png: _report(rows, steps, batch, people, source, preset, overrides, png),
        )
    return {
        "experiment": "rephrase",
        "out_dir": str(out),
        "png": str(png) if png else None,
        "report": str(report),
        "tracking_uri": uri,
        "mlflow_experiment": experiment_name("rephrase"),
        "parent_run_id": parent.run_id,
        "steps": steps,
        "people": people,
        "rephrasings": source,
        "arms": rows,
    }


def _plot(path: Path, arms: list[Arm], rows: dict[str, dict[str, Any]]) -> Path | None:
    def draw(plt: Any, a1: Any, a2: Any, a3: Any) -> None:
        colors = ("tab:gray", "tab:orange", "tab:green")
        labels = [a.label for a in arms if a.label in rows]
        em = [100 * rows[k]["exact_match"] for k in labels]
        a1.bar(labels, em, color=colors[: len(labels)])
        floor = 100 * rows[labels[0]]["majority_baseline"]
        a1.axhline(floor, ls="--", color="black", label=f"most common answer: {floor:.1f}%")
        for i, v in enumerate(em):
            a1.annotate(f"{v:.1f}%", (i, v), ha="center", va="bottom")
        a1.set(ylabel="exact match (%)", title="knowledge_qa on held-out entities and phrasings")
        a1.legend()
        nll = [rows[k]["answer_nll"] for k in labels]
        a2.bar(labels, nll, color=colors[: len(labels)])
        for i, v in enumerate(nll):
            a2.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom")
        a2.set(ylabel="gold answer NLL per token (lower is better)", title="answer likelihood")
        for arm, c in zip(arms, colors, strict=False):
            a3.plot(*series(arm, "train/loss"), color=c, label=arm.label)
        a3.set(xlabel="step (equal compute)", ylabel="train loss", title="training loss")
        a3.legend()
        for a in (a1, a2):
            a.tick_params(axis="x", labelsize=8)

    return save_plot(path, draw, panels=3, figsize=(15, 4.5))


def _report(
    rows: dict[str, dict[str, Any]],
    steps: int,
    batch: int,
    people: int,
    source: str,
    preset: str,
    overrides: list[str],
    png: Path | None,
) -> str:
    first = next(iter(rows.values()))
    lines = [
        "# Experiment: rephrase",
        "",
        f"`{preset}` with {' '.join(EXPERIMENT_MODEL)}"
        f"{' ' + ' '.join(overrides) if overrides else ''}; "
        f"a generated world of {people} people (seed {WORLD_SEED}); every arm {steps} steps of "
        f"{batch} sequences (equal compute: 10 epochs of the raw arm's data), same seed and model.",
        f"Rephrasings: {source}.",
        f"knowledge_qa: {int(first['questions'])} held-out questions (entities without "
        "any training question, phrasings absent from training), greedy, exact match after "
        "normalisation.",
        "",
        "| arm | exact match | gold answer NLL | epochs of its data | tokens per epoch "
        "| final train loss | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {100 * r['exact_match']:.1f}% | {r['answer_nll']:.3f} | "
            f"{r['epochs_seen']:.1f} | {r['train_tokens_per_epoch']:,} | "
            f"{fmt(r['final_train_loss'])} | {r['seconds']} |"
        )
    lines += [
        "",
        "## Reading",
        f"- Always giving a relation's most common training answer scores "
        f"{100 * first['majority_baseline']:.1f}%: the floor any arm must beat.",
        "- The K2 report (SimpleQA): raw 10 epochs 23.76, one rephrasing 10 epochs 27.39, "
        "ten rephrasings 1 epoch 28.94.",
        "- One seed and a tiny model: a gap of a few points of exact match, or a few hundredths "
        "of NLL, is within run-to-run noise at this scale.",
    ]
    if png:
        lines += ["", f"![rephrase]({png.name})"]
    return "\n".join(lines) + "\n"
