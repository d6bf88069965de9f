"""The self-critique rubric reward: a critic compares the K responses pairwise against rubrics.

For each pair (i, j) of responses to one prompt the critic reads the prompt, the core and
prescriptive rubrics and the two responses, and answers A or B; with `both_orders` each pair is
also judged with the responses swapped (position bias cancels). Wins become scores by win rate
or by a Bradley-Terry fit (the probability of beating an average response). The critic is a k2
model driven through the generation `Engine` (a checkpoint, or the policy itself) or any object
with the `generator` interface (`async chat(messages, ...) -> ChatResult`).

Closed loop: on prompts with a verifiable reward, every judged pair whose responses differ in
the verifiable outcome has a known right verdict. `check_against` reports the critic's
agreement on those pairs and returns them as SFT conversations (the correct verdict as the
assistant's answer); `CriticTrainer` takes SFT steps on them.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .options import RubricCriticOptions
from .rewards.base import Reward, RewardResult

_VERDICT_RE = re.compile(r"\b([AB])\b")


def judge_messages(
    prompt: str, a: str, b: str, core: Sequence[str], prescriptive: Sequence[str]
) -> list[dict[str, str]]:
    """The critic's conversation for one ordered pair (A first)."""
    rubric = "\n".join([*(f"- {r}" for r in core), *(f"- (rule) {r}" for r in prescriptive)])
    system = (
        "You compare two responses to the same request against these rubrics:\n"
        f"{rubric}\nAnswer with the single letter of the better response: A or B."
    )
    user = f"Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nWhich is better?"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B', or None when the critic's answer names neither."""
    m = _VERDICT_RE.search(text.strip())
    return m.group(1) if m else None


def prompt_text(prompt: Mapping[str, Any]) -> str:
    """The request a task record poses (its 'prompt', else its last user message)."""
    if "prompt" in prompt:
        return str(prompt["prompt"])
    users = [m.get("content", "") for m in prompt.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def bradley_terry(wins: torch.Tensor, iters: int = 200, prior: float = 0.5) -> torch.Tensor:
    """Bradley-Terry strengths from a win matrix (wins[i, j]: times i beat j), by MM updates.

    A small prior (half a win against every other response each way) keeps strengths finite
    when a response wins or loses every comparison. Returned normalised to geometric mean 1.
    """
    k = wins.shape[0]
    w = wins.double() + prior * (1 - torch.eye(k, dtype=torch.float64))
    games = w + w.T
    p = torch.ones(k, dtype=torch.float64)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        p = w.sum(1) / denom
        p = p / p.log().mean().exp()
    return p


def scores_from_wins(wins: torch.Tensor, method: str) -> torch.Tensor:
    """Per-response scores in [0, 1]: win rate, or P(beat an average response) under
    Bradley-Terry."""
    games = wins + wins.T
    if method == "win_rate":
        played = games.sum(1)
        return torch.where(
            played > 0, wins.sum(1) / played.clamp_min(1), torch.full_like(played, 0.5)
        )
    p = bradley_terry(wins)
    return (p / (p + 1.0)).float()


@dataclass
class Judgement:
    """One ordered comparison: response indices (a, b) and the verdict ('A', 'B' or None)."""

    a: int
    b: int
    verdict: str | None

    @property
    def winner(self) -> int | None:
        """Index of the preferred response (None: no verdict)."""
        return {"A": self.a, "B": self.b}.get(self.verdict or "")


class EngineJudge:
    """A k2 model as the critic, through the generation engine (greedy, batched)."""

    def __init__(self, engine: Any, tokenizer: Any, max_tokens: int = 8):
        self.engine, self.tokenizer, self.max_tokens = engine, tokenizer, max_tokens

    def judge(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """The critic's answer text to each conversation."""
        from k2_data.chat import encode_chat_prompt
        from k2_data.inference.engine import SamplingParams

        # the judged answers are model output: encoded as text, they cannot close the
        # critic's turn or open a system turn of their own
        prompts = [encode_chat_prompt(self.tokenizer, c) for c in conversations]
        outs = self.engine.generate(
            prompts, SamplingParams(temperature=0.0, max_new_tokens=self.max_tokens)
        )
        return [
            self.tokenizer.decode([t for t in o.token_ids if t not in self.engine.default_stop_ids])
            for o in outs
        ]


class GeneratorJudge:
    """Any `generator` (k2 checkpoint, OpenAI-compatible endpoint, ...) as the critic."""

    def __init__(self, generator: Any, max_tokens: int = 8):
        self.generator, self.max_tokens = generator, max_tokens

    def judge(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """The critic's answer text to each conversation (requests run concurrently)."""

        async def all_() -> list[Any]:
            return await asyncio.gather(
                *(
                    self.generator.chat(c, temperature=0.0, max_tokens=self.max_tokens)
                    for c in conversations
                )
            )

        return [str(r.message.get("content") or "") for r in asyncio.run(all_())]


class RubricCritic(Reward):
    """The `rubric_critic` reward: pairwise rubric comparisons turned into scores."""

    name = "rubric_critic"

    def __init__(self, options: RubricCriticOptions, judge: Any = None):
        self.options = options
        self.judge = judge
        self.last_judgements: list[Judgement] = []
        self.last_conversations: list[list[dict[str, str]]] = []

    def compare(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[Judgement]:
        """Every pair judged (both orders when configured)."""
        if self.judge is None:
            raise RuntimeError(
                "rubric_critic has no critic: set `critic` or `generator`, "
                "or let `k2 rl` attach the policy"
            )
        o = self.options
        pairs = list(itertools.combinations(range(len(responses)), 2))
        if o.both_orders:
            pairs += [(b, a) for a, b in pairs]
        q = prompt_text(prompt)
        convs = [
            judge_messages(q, responses[a], responses[b], o.core_rubrics, o.prescriptive_rubrics)
            for a, b in pairs
        ]
        texts = self.judge.judge(convs) if convs else []
        self.last_conversations = convs
        self.last_judgements = [
            Judgement(a, b, parse_verdict(t)) for (a, b), t in zip(pairs, texts, strict=True)
        ]
        return self.last_judgements

    def score(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[RewardResult]:
        """Scores from the pairwise wins (no verdict on a pair counts for neither)."""
        k = len(responses)
        judgements = self.compare(prompt, responses)
        wins = torch.zeros(k, k)
        for j in judgements:
            if j.winner is not None:
                loser = j.b if j.winner == j.a else j.a
                wins[j.winner, loser] += 1
        scores = scores_from_wins(wins, self.options.scoring).tolist()
        no_verdict = sum(j.verdict is None for j in judgements)
        return [
            RewardResult(
                float(s),
                "judged",
                detail=f"{int(wins[i].sum())} wins; {no_verdict} comparisons without a verdict",
            )
            for i, s in enumerate(scores)
        ]


@dataclass
class AgreementReport:
    """How often the critic's verdicts match the verifiable outcomes, and the SFT data."""

    checked: int
    agreed: int
    no_verdict: int
    sft_conversations: list[list[dict[str, str]]]

    @property
    def agreement(self) -> float:
        """Share of checkable pairs the critic got right (0 when none)."""
        return self.agreed / self.checked if self.checked else 0.0


def check_against(critic: RubricCritic, passed: Sequence[bool]) -> AgreementReport:
    """Check the critic's last judgements against verifiable outcomes (True = passed)."""
    checked = agreed = none = 0
    sft = []
    for j, conv in zip(critic.last_judgements, critic.last_conversations, strict=True):
        if passed[j.a] == passed[j.b]:
            continue  # no known right answer
        checked += 1
        right = "A" if passed[j.a] else "B"
        none += j.verdict is None
        agreed += j.verdict == right
        sft.append([*conv, {"role": "assistant", "content": right}])
    return AgreementReport(checked, agreed, none, sft)


class CriticTrainer:
    """SFT steps on the critic's correct verdicts (AdamW; loss on the verdict tokens only)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lr: float = 1e-4):
        self.model, self.tokenizer = model, tokenizer
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(self, conversations: list[list[dict[str, str]]]) -> float:
        """One update on `conversations`; returns the loss before it (nan when there are none)."""
        from .chat_data import encode_conversation, shift_labels

        if not conversations:
            return float("nan")
        pairs = [shift_labels(*encode_conversation(self.tokenizer, c)) for c in conversations]
        width = max(len(i) for i, _ in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for r, (i, lab) in enumerate(pairs):
            ids[r, : len(i)] = torch.tensor(i)
            labels[r, : len(lab)] = torch.tensor(lab)
        was = self.model.training
        self.model.train()
        loss = self.model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "reset_router_counts"):
            self.model.reset_router_counts()
        self.model.train(was)
        return float(loss.detach())


def build_rubric_critic(*, options: RubricCriticOptions) -> RubricCritic:
    """The `rubric_critic` reward, with its critic built from the options when they name one."""
    judge = None
    if options.generator is not None:
        from k2_core.plugins import get_registry

        gen = get_registry().build(
            "generator",
            options.generator,
            options=options.generator_options,
            where="reward_options.generator_options",
        )
        judge = GeneratorJudge(gen, options.max_tokens)
    elif options.critic is not None:
        from k2_data.inference.engine import Engine

        from .checkpoints import resolve_checkpoint

        engine = Engine.from_checkpoint(resolve_checkpoint(options.critic))
        judge = EngineJudge(engine, engine.tokenizer, options.max_tokens)
    return RubricCritic(options, judge)
