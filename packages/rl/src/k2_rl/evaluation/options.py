"""Options of `k2 eval`: one frozen section per task, set with dotted overrides
(`k2 eval URI arithmetic.k=8 knowledge_qa.shots=5`). Import-light (pydantic only)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class PerplexityOptions(BaseModel):
    """Token-weighted loss and perplexity on a held-out split of a packed dataset."""

    model_config = _FROZEN
    data: str | None = Field(
        None, description="Packed dataset URI (None: the checkpoint's own dataset)."
    )
    split: str = Field("val", description="Held-out split of the packed dataset to read.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    max_sequences: int | None = Field(
        None,
        gt=0,
        description="Read at most this many sequences (None: the whole split; "
        "--limit also caps it).",
    )


class ArithmeticOptions(BaseModel):
    """pass@1 (greedy) and pass@k (sampled) on the test split of the built-in math generator."""

    model_config = _FROZEN
    n: int = Field(40, gt=0, description="Problems (--limit caps it).")
    seed: int = Field(0, description="Seed of the problem draw.")
    difficulty: tuple[int, int] = Field(
        (1, 3), description="Digits of the larger operand: (lo, hi)."
    )
    k: int = Field(4, gt=0, description="k of pass@k.")
    samples: int | None = Field(
        None,
        gt=0,
        description="Sampled solutions per problem for pass@k (None: k); pass@k is "
        "the unbiased estimate.",
    )
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the pass@k samples.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling of the pass@k samples.")
    max_new_tokens: int = Field(256, gt=0, description="Longest generated solution.")


class KnowledgeQAOptions(BaseModel):
    """Exact match on the knowledge world's held-out questions (phrasings absent from training)."""

    model_config = _FROZEN
    n: int | None = Field(300, gt=0, description="Questions (None: all; --limit caps it).")
    world_seed: int | None = Field(
        None,
        description="Seed of the world asked about (None: the one in the checkpoint's "
        "dataset, else 0).",
    )
    world_scale: float | None = Field(
        None,
        gt=0,
        description="Scale of that world (None: as in the checkpoint's dataset, else 1).",
    )
    world_people: int | None = Field(
        None,
        gt=0,
        description="People in that world (overrides world_scale; e.g. an experiment's own world).",
    )
    shots: int = Field(
        3, ge=0, description="Solved train-split questions shown before each question."
    )
    max_new_tokens: int = Field(16, gt=0, description="Longest generated answer.")


class CodeOptions(BaseModel):
    """pass@1 (greedy) on generated Python exercises, run by the sandboxed `code` reward."""

    model_config = _FROZEN
    n: int = Field(20, gt=0, description="Exercises (--limit caps it).")
    seed: int = Field(0, description="Seed of the exercise draw.")
    max_new_tokens: int = Field(160, gt=0, description="Longest generated function body.")
    timeout_s: float = Field(
        5.0, gt=0, description="Wall-clock limit of one program in the sandbox."
    )


class EvalOptions(BaseModel):
    """Every task's options; only the tasks asked for are run."""

    model_config = _FROZEN
    perplexity: PerplexityOptions = Field(
        default_factory=PerplexityOptions, description="perplexity task."
    )
    arithmetic: ArithmeticOptions = Field(
        default_factory=ArithmeticOptions, description="arithmetic task."
    )
    knowledge_qa: KnowledgeQAOptions = Field(
        default_factory=KnowledgeQAOptions, description="knowledge_qa task."
    )
    code: CodeOptions = Field(default_factory=CodeOptions, description="code task.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together by the engine.")
    seed: int = Field(0, description="Seed of every sampled generation.")


TASK_NAMES: tuple[str, ...] = ("perplexity", "arithmetic", "knowledge_qa", "code")
