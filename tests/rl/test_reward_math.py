"""The `math` reward: answer extraction, equivalence (fractions, decimals, LaTeX), wrong answers."""

from __future__ import annotations

import pytest
from k2_core.errors import ConfigError
from k2_data.corpus.mathgen import check_math_answer
from k2_rl.rewards.answer import answers_equal, boxed, extract_answer, sympy_equal
from k2_rl.rewards.math_reward import MathReward
from k2_rl.rewards.options import MathRewardOptions


@pytest.mark.parametrize(
    "text, want",
    [
        ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("Natalia sold 48 clips.\n#### 1,234", "1,234"),
        ("Step 1: 3 + 4 = 7\nAnswer: 7", "7"),
        ("**Answer:** $42$.", "42"),
        ("Therefore, the answer is $0.75$.", "0.75"),
        ("I computed 3 and then 12 apples", "12"),
        ("no digits at all", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_boxed_balances_braces_and_last_number_is_optional():
    assert boxed("\\boxed{\\frac{\\sqrt{2}}{2}}") == "\\frac{\\sqrt{2}}{2}"
    assert boxed("\\boxed{unclosed") is None
    assert extract_answer("got 5 apples", last_number=False) is None


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("1/2", "0.5"),
        ("\\frac{3}{4}", "0.75"),
        ("0.75", "\\frac{3}{4}"),
        ("1234", "1,234"),
        ("3", "3.0"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("5", "x = 5"),
        ("\\frac{\\pi}{2}", "\\pi/2"),
        ("2x + 2", "2(x+1)"),
    ],
)
def test_equivalent_answers(gold, pred):
    assert answers_equal(gold, pred)


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("1/2", "0.51"),
        ("\\frac{1}{3}", "0.3333"),
        ("7", "8"),
        ("\\sqrt{2}", "2"),
        ("x+1", "x-1"),
    ],
)
def test_different_answers(gold, pred):
    assert not answers_equal(gold, pred)


def test_sympy_fallback_alone():
    assert sympy_equal("\\frac{2}{4}", "1/2") and sympy_equal("2\\sqrt{2}", "sqrt(8)")
    assert not sympy_equal("3", "4") and not sympy_equal("{{", "1")
    assert answers_equal("\\frac{6}{4}", "1.5", use_math_verify=False)


def test_math_reward_scores_batch():
    reward = MathReward()
    task = {"prompt": "What is 1/4 + 1/4?", "answer": "\\frac{1}{2}"}
    res = reward.score(
        task,
        ["... \\boxed{0.5}", "Answer: 1/2", "The answer is 2/4.", "#### 0.25", "I am not sure."],
    )
    assert [r.outcome for r in res] == ["pass", "pass", "pass", "wrong", "no_answer"]
    assert [r.score for r in res] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert not any(r.excluded for r in res) and "0.25" in res[3].detail


def test_math_reward_agrees_with_builtin_arithmetic_checker():
    solution = "Step 1: 120 + 35 = 155\nAnswer: 155"
    task = {"prompt": "120 + 35", "answer": "155"}
    assert check_math_answer(solution, "155")
    assert MathReward().score(task, [solution])[0].outcome == "pass"
    assert MathReward().score(task, [solution.replace("155", "154")])[0].outcome == "wrong"


def test_math_reward_options_and_errors():
    reward = MathReward(MathRewardOptions(no_answer_score=-0.5, last_number_fallback=False))
    assert reward.score({"answer": "3"}, ["three apples, 3"])[0].score == -0.5
    with pytest.raises(ConfigError, match="answer"):
        MathReward().score({"prompt": "x"}, ["1"])
