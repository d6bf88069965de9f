"""The built-in, offline evaluation tasks of `k2 eval`.

Each task is `task(target, options, limit) -> {metric: value}` (numbers only); `limit` caps the
task's item count (sequences, problems, questions, exercises).

- `perplexity`: token-weighted loss on a held-out split of a packed dataset;
- `arithmetic`: pass@1 greedy and pass@k sampled on the built-in math generator's test split,
  prompted as in the training documents (`Problem: ...\\nSolution:\\n`);
- `knowledge_qa`: exact match on the knowledge world's held-out questions (entities and
  phrasings that no training question uses), few-shot with train-split questions; also the
  gold answer's mean negative log-likelihood (graded where exact match is still 0) and the
  exact match of always answering a relation's most common answer (the chance floor);
- `code`: pass@1 greedy on generated Python exercises, run by the sandboxed `code` reward.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .generate import complete
from .options import (
    ArithmeticOptions,
    CodeOptions,
    KnowledgeQAOptions,
    PerplexityOptions,
)


def _cap(n: int | None, limit: int | None) -> int | None:
    if n is None:
        return limit
    return n if limit is None else min(n, limit)


# -- perplexity -------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(
    target: Any, opts: PerplexityOptions, limit: int | None, *, batch_size: int = 8, **_: Any
) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the split's sequences, in order."""
    from k2_core.errors import ConfigError
    from k2_data.loader import PackedDataset, PackedOptions

    uri = opts.data or target.data_uri
    if uri is None:
        raise ConfigError(
            "perplexity: no packed dataset known for this checkpoint; set perplexity.data"
        )
    ds = PackedDataset(
        PackedOptions(
            uri=uri,
            split=opts.split,
            batch_size=opts.batch_size,
            shuffle=False,
            drop_last=False,
            prefetch=0,
        )
    )
    try:
        n = ds.n_sequences
        n = min(n, _cap(opts.max_sequences, limit) or n)
        total, tokens, seen = 0.0, 0, 0
        model = target.model
        while seen < n:
            batch = next(ds)
            take = min(n - seen, batch["input_ids"].shape[0])
            batch = {k: v[:take] for k, v in batch.items()}
            count = int((batch["labels"] != -100).sum())
            loss = model(**batch, return_logits=False).loss
            total += float(loss) * count
            tokens += count
            seen += take
    finally:
        ds.close()
    mean = total / max(tokens, 1)
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "tokens": float(tokens),
        "sequences": float(seen),
    }


# -- arithmetic -------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def arithmetic(
    target: Any, opts: ArithmeticOptions, limit: int | None, *, batch_size: int = 16, seed: int = 0
) -> dict[str, float]:
    """pass@1 greedy and pass@k sampled on the math generator's test split."""
    from k2_data.corpus import check_math_answer, math_problems

    problems = math_problems(
        "test", opts.seed, n=_cap(opts.n, limit) or opts.n, difficulty=tuple(opts.difficulty)
    )
    prompts = [f"Problem: {p.question}\nSolution:\n" for p in problems]
    stop = ("\nProblem:", "\n\n")
    greedy = complete(
        target, prompts, max_new_tokens=opts.max_new_tokens, stop=stop, batch_size=batch_size
    )
    ok1 = [check_math_answer(g[0], p.answer) for g, p in zip(greedy, problems, strict=True)]
    samples = opts.samples or opts.k
    k = min(opts.k, samples)
    sampled = complete(
        target,
        prompts,
        max_new_tokens=opts.max_new_tokens,
        stop=stop,
        temperature=opts.temperature,
        top_p=opts.top_p,
        n=samples,
        seed=seed,
        batch_size=batch_size,
    )
    correct = [
        sum(check_math_answer(s, p.answer) for s in ss)
        for ss, p in zip(sampled, problems, strict=True)
    ]
    return {
        "pass_at_1": sum(ok1) / len(problems),
        f"pass_at_{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(problems),
        "sample_accuracy": sum(correct) / (samples * len(problems)),
        "problems": float(len(problems)),
    }


# -- knowledge_qa ---------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower case, outer punctuation and articles dropped, spaces collapsed (for exact match)."""
    s = s.strip().lower().strip(" .,;:!?\"'")
    s = re.sub(r"^(the|a|an)\s+", "", s)
    return re.sub(r"\s+", " ", s)


def qa_prompt(demos: list[Any], question: str) -> str:
    """Few-shot prompt: solved demos, then the question (the format rephrase trains on)."""
    shots = "".join(f"Question: {d.question}\nAnswer: {d.answer}\n\n" for d in demos)
    return f"{shots}Question: {question}\nAnswer:"


def resolve_world(target: Any, opts: KnowledgeQAOptions) -> Any:
    """The world the questions are about: the options', else the one of the checkpoint's
    built-in corpus (its seed and knowledge scale), else seed 0 at scale 1."""
    from k2_data.corpus import World, builtin_world

    seed, scale = opts.world_seed, opts.world_scale
    manifest = target.manifest() if target is not None else None
    if manifest is not None:
        cfg = manifest.get("config", {})
        for src in cfg.get("sources", []):
            if src.get("kind") == "builtin" and src.get("domain") == "knowledge":
                scale = scale if scale is not None else float(src.get("scale", 1.0))
                seed = seed if seed is not None else int(cfg.get("seed", 0))
    seed = 0 if seed is None else seed
    if opts.world_people is not None:
        return World.generate(seed, n_people=opts.world_people)
    return builtin_world(seed, 1.0 if scale is None else scale)


def _relation(fact_id: str) -> str:
    return fact_id.split("/")[0] + "." + fact_id.rsplit(".", 1)[1]


def pick_questions(world: Any, n: int | None, shots: int) -> tuple[list[Any], list[Any]]:
    """(demos, questions): `shots` train-split demos of different relations, and up to `n`
    held-out questions in a seeded order that mixes entity kinds."""
    train = world.questions("train")
    heldout = list(world.questions("heldout"))
    random.Random(0).shuffle(heldout)
    r = random.Random(1)
    demos, used = [], set()
    for q in r.sample(train, len(train)):
        if len(demos) >= shots:
            break
        if _relation(q.fact_id) not in used:
            demos.append(q)
            used.add(_relation(q.fact_id))
    return demos, heldout[:n] if n else heldout


@torch.no_grad()
def answer_nll(target: Any, prompts: list[str], answers: list[str], batch_size: int = 16) -> float:
    """Mean per-token negative log-likelihood of ' answer' after each prompt (teacher-forced)."""
    tok, model = target.tokenizer, target.model
    pids = tok.encode_batch(prompts)
    aids = tok.encode_batch([" " + a for a in answers])
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        rows = [
            p + a for p, a in zip(pids[i : i + batch_size], aids[i : i + batch_size], strict=True)
        ]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, (row, a) in enumerate(zip(rows, aids[i : i + batch_size], strict=True)):
            ids[j, : len(row)] = torch.tensor(row)
            labels[j, len(row) - len(a) - 1 : len(row) - 1] = torch.tensor(a)  # shifted: predict a
        logits = model(ids, return_logits=True).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((labels != -100).sum())
    return total / max(count, 1)


def knowledge_qa(
    target: Any,
    opts: KnowledgeQAOptions,
    limit: int | None,
    *,
    batch_size: int = 16,
    world: Any = None,
    **_: Any,
) -> dict[str, float]:
    """Exact match on held-out questions, the gold answer's NLL, and the majority floor."""
    world = world if world is not None else resolve_world(target, opts)
    demos, questions = pick_questions(world, _cap(opts.n, limit), opts.shots)
    prompts = [qa_prompt(demos, q.question) for q in questions]
    preds = complete(
        target, prompts, max_new_tokens=opts.max_new_tokens, stop=("\n",), batch_size=batch_size
    )
    hits = [
        normalize_answer(p[0]) == normalize_answer(q.answer)
        for p, q in zip(preds, questions, strict=True)
    ]
    common: dict[str, Counter[str]] = {}
    for q in world.questions("train"):
        common.setdefault(_relation(q.fact_id), Counter())[q.answer] += 1
    floor = [
        bool(common.get(_relation(q.fact_id)))
        and common[_relation(q.fact_id)].most_common(1)[0][0] == q.answer
        for q in questions
    ]
    return {
        "exact_match": sum(hits) / len(questions),
        "answer_nll": answer_nll(target, prompts, [q.answer for q in questions], batch_size),
        "majority_baseline": sum(floor) / len(questions),
        "questions": float(len(questions)),
    }


# -- code -----------------------------------------------------------------------------------------


def code(
    target: Any, opts: CodeOptions, limit: int | None, *, batch_size: int = 16, **_: Any
) -> dict[str, float]:
    """pass@1 greedy on generated exercises; each completed program runs in the sandbox with
    its tests through the `code` reward."""
    from .exercises import cut_body, generate_exercises
    from .sandboxed import run_programs

    exercises = generate_exercises(_cap(opts.n, limit) or opts.n, opts.seed)
    outs = complete(
        target,
        [e.prompt for e in exercises],
        max_new_tokens=opts.max_new_tokens,
        stop=("\ndef ", "\nclass ", "\nif __name__", "\n\n\n"),
        batch_size=batch_size,
    )
    bodies = [cut_body(o[0]) for o in outs]
    passed = run_programs(exercises, bodies, timeout_s=opts.timeout_s)
    return {"pass_at_1": sum(passed) / len(exercises), "exercises": float(len(exercises))}


TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "perplexity": perplexity,
    "arithmetic": arithmetic,
    "knowledge_qa": knowledge_qa,
    "code": code,
}
