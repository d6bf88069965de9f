"""The rubric critic: pairwise verdicts -> scores, agreement with verifiable outcomes, critic
SFT."""

from __future__ import annotations

import re

import pytest
import torch
from k2_rl.critic import (
    CriticTrainer,
    EngineJudge,
    RubricCritic,
    bradley_terry,
    check_against,
    judge_messages,
    parse_verdict,
    scores_from_wins,
)
from k2_rl.options import RubricCriticOptions
from rl_fixtures import tiny_configs, tiny_tokenizer


class KeywordJudge:
    """A rule critic: prefers the response stating the expected answer (else says nothing)."""

    def __init__(self, answer: str, flip: bool = False):
        self.answer, self.flip, self.seen = answer, flip, []

    def judge(self, conversations):
        out = []
        for c in conversations:
            self.seen.append(c)
            text = c[-1]["content"]
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
            b = re.search(r"Response B:\n(.*?)\n\nWhich", text, re.S).group(1)
            good_a, good_b = self.answer in a, self.answer in b
            verdict = "A" if good_a and not good_b else "B" if good_b and not good_a else "no idea"
            if self.flip and verdict in "AB":
                verdict = {"A": "B", "B": "A"}[verdict]
            out.append(f"{verdict}")
        return out


def test_scores_from_wins_hand_cases():
    wins = torch.tensor([[0.0, 2, 2], [0, 0, 2], [0, 0, 0]])
    assert scores_from_wins(wins, "win_rate").tolist() == pytest.approx([1.0, 0.5, 0.0])
    bt = scores_from_wins(wins, "bradley_terry")
    assert bt[0] > bt[1] > bt[2] and 0 < bt[2] < bt[0] < 1
    # equal records give equal strengths
    p = bradley_terry(torch.tensor([[0.0, 1], [1, 0]]))
    assert p.tolist() == pytest.approx([1.0, 1.0])


def test_rubric_critic_ranks_and_checks_itself():
    opts = RubricCriticOptions(scoring="win_rate", prescriptive_rubrics=("Be brief.",))
    critic = RubricCritic(opts, KeywordJudge("Answer: 12"))
    responses = ["Answer: 12", "Answer: 13", "I do not know", "So 7 + 5 = 12.\nAnswer: 12"]
    res = critic.score({"prompt": "What is 7 + 5?", "answer": "12"}, responses)
    scores = [r.score for r in res]
    assert scores[0] == scores[3] == pytest.approx(1.0) and scores[1] == scores[2] == 0.0
    assert len(critic.last_judgements) == 12  # 6 pairs, both orders
    system = critic.judge.seen[0][0]["content"]
    assert "The final answer is correct" in system and "(rule) Be brief." in system

    rep = check_against(critic, [True, False, False, True])
    assert rep.checked == 8 and rep.agreed == 8 and rep.agreement == 1.0
    assert all(
        c[-1]["role"] == "assistant" and c[-1]["content"] in "AB" for c in rep.sft_conversations
    )

    wrong = RubricCritic(opts, KeywordJudge("Answer: 12", flip=True))
    wrong.score({"prompt": "What is 7 + 5?"}, responses)
    assert check_against(wrong, [True, False, False, True]).agreement == 0.0


def test_verdict_parsing_and_messages():
    assert parse_verdict(" A") == "A" and parse_verdict("B is better") == "B"
    assert parse_verdict("neither") is None
    msgs = judge_messages("q?", "one", "two", ["core"], ["rule"])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Response A:\none" in msgs[1]["content"] and "Response B:\ntwo" in msgs[1]["content"]


@pytest.fixture(scope="module")
def tiny():
    from k2_core.model import K2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return K2ForCausalLM(*tiny_configs(tok.vocab_size)), tok


def test_engine_critic_and_its_sft_step(tiny):
    from k2_data.inference.engine import Engine

    model, tok = tiny
    engine = Engine(model, tok)
    critic = RubricCritic(RubricCriticOptions(max_tokens=3), EngineJudge(engine, tok, 3))
    res = critic.score({"prompt": "What is 1 + 1?"}, ["Answer: 2", "Answer: 3", "Answer: 4"])
    assert len(res) == 3 and all(0.0 <= r.score <= 1.0 for r in res)
    assert len(critic.last_judgements) == 6
    rep = check_against(critic, [True, False, False])
    assert rep.checked == 4 and len(rep.sft_conversations) == 4
    trainer = CriticTrainer(model, tok, lr=3e-3)
    losses = [trainer.step(rep.sft_conversations) for _ in range(4)]
    assert losses[-1] < losses[0]  # the critic learns its verdicts
