"""The `math` domain: problems with correct worked solutions, disjoint splits, answer checking."""

from __future__ import annotations

import re

import pytest
from k2_core.errors import ConfigError
from k2_data.corpus import MathProblem, check_math_answer, extract_answer, math_problems
from k2_data.corpus.mathgen import KINDS

_TAIL = re.compile(r"[\d\s+\-*/()]+$")
_HEAD = re.compile(r"^\s*(-?\d+)")


def _expr_value(expr: str) -> int | None:
    """An integer expression's value (exact division as //), or None when `expr` is not one."""
    expr = expr.strip()
    if not re.search(r"\d [-+*/] ", expr) or expr.count("(") != expr.count(")"):
        return None
    if expr[0] in "+*/)" or expr.startswith("- "):
        return None
    return eval(expr.replace(" / ", " // "), {"__builtins__": {}}, {})  # noqa: S307 - digits, operators


def check_lines(p: MathProblem) -> int:
    """Every `<arithmetic> = <integer>` in the solution holds; returns how many were checked."""
    n = 0
    for line in p.solution.splitlines():
        parts = line.split(" = ")
        for left, right in zip(parts, parts[1:], strict=False):
            tail, head = _TAIL.search(left), _HEAD.match(right)
            if not tail or not head:
                continue
            value = _expr_value(tail.group(0))
            if value is None:
                continue
            assert value == int(head.group(1)), (line, p.question)
            n += 1
    return n


def solve_question(p: MathProblem) -> int | None:
    """The answer recomputed from the question alone, for the arithmetic and equation kinds."""
    q = p.question
    if p.kind in ("addition", "subtraction", "multiplication", "division"):
        nums = [int(x) for x in re.findall(r"\d+", q)]
        a, b = nums
        if "Subtract" in q:
            a, b = b, a
        ops = {
            "addition": lambda: a + b,
            "subtraction": lambda: a - b,
            "multiplication": lambda: a * b,
            "division": lambda: a // b,
        }
        if p.kind == "division":
            assert a % b == 0
        return ops[p.kind]()
    if p.kind == "equation":
        eq = (
            q.split(":", 1)[1]
            if ":" in q
            else q.replace("Find x if ", "").replace("Solve the equation ", "")
        )
        eq = eq.strip().rstrip(".")
        lhs, rhs = eq.split(" = ")

        def f(side: str, x: int) -> int:
            side = re.sub(r"(\d)x", r"\1*x", side)
            side = re.sub(r"(\d)\(", r"\1*(", side)
            return eval(side, {"__builtins__": {}}, {"x": x})  # noqa: S307

        x = int(p.answer)
        assert f(lhs, x) == f(rhs, x), q
        assert f(lhs, x + 1) != f(rhs, x + 1)  # a unique solution (linear, not an identity)
        return x
    return None


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5, 8])
def test_every_solution_is_correct(difficulty):
    problems = math_problems("train", seed=difficulty, n=400, difficulty=difficulty)
    kinds = {p.kind for p in problems}
    assert kinds == set(KINDS)
    checked = 0
    for p in problems:
        assert p.solution.splitlines()[-1] == f"Answer: {p.answer}"
        assert check_math_answer(p.solution, p.answer)
        assert p.text.startswith(f"Problem: {p.question}\nSolution:\n")
        checked += check_lines(p)
        want = solve_question(p)
        if want is not None:
            assert int(p.answer) == want, p.question
    assert checked > len(problems)


def test_word_problems_final_step_gives_answer():
    for p in math_problems("train", seed=3, n=300, difficulty=4, kinds=("word",)):
        assert check_lines(p) >= 1
        last = p.solution.splitlines()[-2]
        assert re.search(rf"= {re.escape(p.answer)}\b", last), (last, p.answer)


def test_multiplication_shows_partial_products():
    p = next(
        p
        for p in math_problems("train", seed=0, n=200, difficulty=4, kinds=("multiplication",))
        if len(str(re.findall(r"\d+", p.question)[1])) >= 2
    )
    assert "partial products" in p.solution


def test_difficulty_sets_digits():
    for p in math_problems("train", seed=0, n=100, difficulty=6, kinds=("addition",)):
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        assert max(len(str(x)) for x in nums) == 6


def test_seeded_and_deterministic():
    a = math_problems("train", seed=7, n=50)
    assert a == math_problems("train", seed=7, n=50)
    assert a != math_problems("train", seed=8, n=50)


def test_splits_are_disjoint_by_question():
    qs = {
        s: {
            p.question
            for seed in (0, 1)
            for p in math_problems(s, seed=seed, n=300, difficulty=(1, 3))
        }
        for s in ("train", "val", "test")
    }
    assert (
        not qs["train"] & qs["val"] and not qs["train"] & qs["test"] and not qs["val"] & qs["test"]
    )


def test_check_math_answer():
    assert check_math_answer("work\nAnswer: 1234", 1234)
    assert check_math_answer("Answer: 1,234.", "1234")
    assert check_math_answer("Answer: -7", -7)
    assert check_math_answer("answer: x = 5", 5)
    assert check_math_answer("**Answer:** 12", "12")
    assert check_math_answer("Answer: 3\nAnswer: 4", 4)
    assert not check_math_answer("Answer: 3\nAnswer: 4", 3)
    assert not check_math_answer("the answer is 4", 4)
    assert not check_math_answer("Answer: four", 4)
    assert extract_answer("a\nAnswer:  42  \n") == "42"


def test_bad_arguments():
    with pytest.raises(ConfigError):
        math_problems("train", difficulty=0)
    with pytest.raises(ConfigError):
        math_problems("train", kinds=("calculus",))
