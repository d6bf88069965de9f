"""The `math` domain: generated arithmetic and word problems with worked, checkable solutions.

Every solution ends with a line `Answer: <integer>`. Problem kinds: column addition and
subtraction (carries and borrows spelled out), multiplication by partial products, long
division, linear equations in x, and word problems. `difficulty` is the number of digits of
the larger operand. A problem's split is fixed by a stable hash of its question text, so
train, val and test never share a question whatever the seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from k2_core.errors import ConfigError

from ..documents import Document
from ._util import check_scale, check_split, rng, split_of
from .names import person_name

VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
PROBLEMS_AT_SCALE_1 = 6000  # train problems in the built-in corpus at scale 1 (~1.5M chars)
MAX_DIFFICULTY = 12

_PLACES = (
    "ones",
    "tens",
    "hundreds",
    "thousands",
    "ten-thousands",
    "hundred-thousands",
    "millions",
    "ten-millions",
    "hundred-millions",
    "billions",
    "ten-billions",
    "hundred-billions",
    "trillions",
)


@dataclass(frozen=True)
class MathProblem:
    """One problem: the question, a worked solution whose last line is `Answer: <answer>`."""

    question: str
    solution: str
    answer: str
    kind: str = ""

    @property
    def text(self) -> str:
        """The problem as a training document."""
        return f"Problem: {self.question}\nSolution:\n{self.solution}"


# --- answer checking --------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"^\s*\**\s*answer\s*\**\s*[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def _norm(s: str) -> str:
    s = s.strip().strip("*").strip().rstrip(".").strip()
    s = s.replace(",", "").replace(" ", "").replace("$", "")
    if s.startswith("x="):
        s = s[2:]
    return s


def extract_answer(text: str) -> str | None:
    """The value on the last `Answer:` line of `text`, or None when there is none."""
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def check_math_answer(text: str, answer: str | int | float) -> bool:
    """True when the last `Answer:` line of `text` states `answer` (numerically when both are
    numbers)."""
    got = extract_answer(text)
    if got is None:
        return False
    g, want = _norm(got), _norm(str(answer))
    if g == want:
        return True
    try:
        return float(g) == float(want)
    except ValueError:
        return False


# --- formatting helpers -----------------------------------------------------------------------


def _place(i: int) -> str:
    return _PLACES[i] if i < len(_PLACES) else f"column {i + 1}"


def _number(r: random.Random, digits: int) -> int:
    digits = max(1, digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return r.randint(lo, 10**digits - 1)


def _term(coef: int, var: str = "x") -> str:
    if coef == 1:
        return var
    if coef == -1:
        return f"-{var}"
    return f"{coef}{var}"


def _linear(a: int, b: int) -> str:
    """a*x + b written as people do: 3x + 4, -x - 2, 5x."""
    s = _term(a)
    if b > 0:
        s += f" + {b}"
    elif b < 0:
        s += f" - {-b}"
    return s


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


# --- the kinds --------------------------------------------------------------------------------


def _column_add(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = ["Add the numbers column by column, starting from the ones."], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{_place(i)}: {x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"The final carry {carry} becomes the leading digit.")
    return lines


def _addition(r: random.Random, d: int) -> tuple[str, list[str], int]:
    a, b = _number(r, d), _number(r, r.randint(1, d))
    if r.random() < 0.5:
        a, b = b, a
    q = r.choice(
        [
            "What is {a} + {b}?",
            "Compute {a} + {b}.",
            "Add {a} and {b}.",
            "Find the sum of {a} and {b}.",
        ]
    ).format(a=a, b=b)
    lines = _column_add(a, b)
    lines.append(f"So {a} + {b} = {a + b}.")
    return q, lines, a + b


def _column_sub(a: int, b: int) -> list[str]:
    """Steps of a - b for a >= b >= 0."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = ["Subtract column by column, starting from the ones, borrowing when needed."], 0
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        top = x - borrow
        head = f"{_place(i)}: {x} - {borrow} borrowed = {top}" if borrow else f"{_place(i)}: {x}"
        if top < y:
            lines.append(f"{head}, less than {y}, so borrow 10: {top + 10} - {y} = {top + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{head}, {top} - {y} = {top - y}")
            borrow = 0
    return lines


def _subtraction(r: random.Random, d: int) -> tuple[str, list[str], int]:
    a, b = _number(r, d), _number(r, r.randint(1, d))
    if r.random() < 0.75 and b > a:
        a, b = b, a
    q = r.choice(
        [
            "What is {a} - {b}?",
            "Compute {a} - {b}.",
            "Subtract {b} from {a}.",
            "Find the difference {a} - {b}.",
        ]
    ).format(a=a, b=b)
    if a >= b:
        lines = _column_sub(a, b)
    else:
        lines = [f"{b} is larger than {a}, so compute {b} - {a} and make the result negative."]
        lines += _column_sub(b, a)
    lines.append(f"So {a} - {b} = {a - b}.")
    return q, lines, a - b


def _multiplication(r: random.Random, d: int) -> tuple[str, list[str], int]:
    a, b = max(2, _number(r, d)), max(2, _number(r, r.randint(1, max(1, min(d, 4)))))
    q = r.choice(
        [
            "What is {a} * {b}?",
            "Compute {a} * {b}.",
            "Multiply {a} by {b}.",
            "Find the product of {a} and {b}.",
        ]
    ).format(a=a, b=b)
    db = str(b)[::-1]
    lines = [f"Multiply {a} by each digit of {b}, shifted to its place value."]
    parts = []
    for i, ch in enumerate(db):
        m = int(ch) * 10**i
        parts.append(a * m)
        lines.append(f"{a} * {m} = {a * m}")
    if len(parts) > 1:
        lines.append(
            "Add the partial products: " + " + ".join(map(str, parts)) + f" = {sum(parts)}"
        )
    lines.append(f"So {a} * {b} = {a * b}.")
    return q, lines, a * b


def _long_division(n: int, dv: int) -> list[str]:
    s = str(n)
    lines = [f"Divide {n} by {dv} using long division."]
    i, cur = 0, 0
    while i < len(s) - 1 and cur * 10 + int(s[i]) < dv:
        cur = cur * 10 + int(s[i])
        i += 1
    cur = cur * 10 + int(s[i])
    i += 1
    q = cur // dv
    lines.append(f"{cur} / {dv} = {q}, {q} * {dv} = {q * dv}, {cur} - {q * dv} = {cur - q * dv}")
    rem = cur - q * dv
    while i < len(s):
        cur = rem * 10 + int(s[i])
        q = cur // dv
        lines.append(
            f"bring down {s[i]}: {cur} / {dv} = {q}, {q} * {dv} = {q * dv}, "
            f"{cur} - {q * dv} = {cur - q * dv}"
        )
        rem = cur - q * dv
        i += 1
    return lines


def _division(r: random.Random, d: int) -> tuple[str, list[str], int]:
    dv = _number(r, r.randint(1, max(1, min(d - 1, 3)))) if d > 1 else r.randint(2, 9)
    dv = max(dv, 2)
    quot = _number(r, max(1, d - len(str(dv)) + 1))
    n = dv * quot
    q = r.choice(
        [
            "What is {n} / {d}?",
            "Compute {n} / {d}.",
            "Divide {n} by {d}.",
            "Find the quotient of {n} divided by {d}.",
        ]
    ).format(n=n, d=dv)
    lines = _long_division(n, dv)
    lines.append(f"The remainder is 0, so {n} / {dv} = {quot}.")
    return q, lines, quot


def _nonzero(r: random.Random, lo: int, hi: int) -> int:
    v = 0
    while v == 0:
        v = r.randint(lo, hi)
    return v


def _equation(r: random.Random, d: int) -> tuple[str, list[str], int]:
    lim = 10 ** max(1, d - 1)
    x = r.randint(-lim, lim)
    a = _nonzero(r, -min(12, 3 * d + 3), min(12, 3 * d + 3))
    b = _nonzero(r, -(10**d) + 1, 10**d - 1)
    form = r.randrange(3)
    ask = r.choice(["Solve for x: {eq}.", "Find x if {eq}.", "Solve the equation {eq}."])
    lines: list[str] = []

    def isolate(coef: int, const: int, rhs: int) -> None:
        # coef*x + const = rhs  ->  x
        if const > 0:
            lines.append(
                f"Subtract {const} from both sides: {_term(coef)} = {rhs} - {const} = {rhs - const}"
            )
        elif const < 0:
            lines.append(
                f"Add {-const} to both sides: {_term(coef)} = {rhs} + {-const} = {rhs - const}"
            )
        if coef != 1:
            lines.append(f"Divide both sides by {coef}: x = {rhs - const} / {_paren(coef)} = {x}")

    if form == 0:  # a x + b = c
        c = a * x + b
        eq = f"{_linear(a, b)} = {c}"
        isolate(a, b, c)
        check = f"{_paren(a)} * {_paren(x)} + {_paren(b)} = {c}"
    elif form == 1:  # a x + b = c x + e
        c = _nonzero(r, -12, 12)
        while c == a:
            c = _nonzero(r, -12, 12)
        e = a * x + b - c * x
        eq = f"{_linear(a, b)} = {_linear(c, e)}"
        k = a - c
        if c > 0:
            lines.append(f"Subtract {_term(c)} from both sides: {_linear(k, b)} = {e}")
        else:
            lines.append(f"Add {_term(-c)} to both sides: {_linear(k, b)} = {e}")
        isolate(k, b, e)
        check = (
            f"{_paren(a)} * {_paren(x)} + {_paren(b)} = {a * x + b} and "
            f"{_paren(c)} * {_paren(x)} + {_paren(e)} = {c * x + e}"
        )
    else:  # a (x + b) = c
        c = a * (x + b)
        eq = (
            f"{a}(x {'+' if b > 0 else '-'} {abs(b)}) = {c}" if a != 1 else f"{_linear(1, b)} = {c}"
        )
        if a != 1:
            lines.append(
                f"Divide both sides by {a}: x {'+' if b > 0 else '-'} {abs(b)} = "
                f"{c} / {_paren(a)} = {x + b}"
            )
        isolate(1, b, x + b)
        check = f"{_paren(a)} * ({_paren(x)} + {_paren(b)}) = {c}"
    lines.append(f"Check: {check}.")
    lines.append(f"So x = {x}.")
    return ask.format(eq=eq), lines, x


_ITEMS = (
    "apples",
    "pencils",
    "notebooks",
    "marbles",
    "stickers",
    "oranges",
    "books",
    "cards",
    "cookies",
    "bottles",
    "tickets",
    "candles",
)


def _word(r: random.Random, d: int) -> tuple[str, list[str], int]:
    name, other = person_name(r), person_name(r)
    first, other_first = name.split()[0], other.split()[0]
    item = r.choice(_ITEMS)
    kind = r.randrange(6)
    small = max(1, d - 1)
    if kind == 0:  # shopping with change
        n, p = r.randint(2, 9 * small + 3), max(1, _number(r, small))
        cost = n * p
        bill = next(
            v
            for v in (
                10,
                20,
                50,
                100,
                200,
                500,
                1000,
                2000,
                5000,
                10_000,
                20_000,
                50_000,
                100_000,
                10**6,
                10**7,
                10**8,
                10**9,
                10**12,
            )
            if v >= cost
        )
        q = (
            f"{name} buys {n} {item} at {p} dollars each and pays with {bill} dollars. "
            f"How many dollars of change does {first} get back?"
        )
        lines = [
            f"The {item} cost {n} * {p} = {cost} dollars.",
            f"The change is {bill} - {cost} = {bill - cost} dollars.",
        ]
        return q, lines, bill - cost
    if kind == 1:  # distance = speed * time
        v, t = _number(r, min(d, 3)) + 10, r.randint(2, 12)
        q = r.choice(
            [
                "A train travels at {v} km per hour for {t} hours. How many km does it travel?",
                "A cyclist rides at {v} km per hour for {t} hours. "
                "How far does the cyclist go, in km?",
            ]
        ).format(v=v, t=t)
        return q, [f"Distance is speed times time: {v} * {t} = {v * t} km."], v * t
    if kind == 2:  # equal sharing, exact
        k = r.randint(2, 12)
        each = _number(r, small) + 1
        total = k * each
        q = (
            f"{name} has {total} {item} and shares them equally among {k} friends "
            "with none left over. "
            f"How many {item} does each friend get?"
        )
        return q, [f"Each friend gets {total} / {k} = {each} {item}."], each
    if kind == 3:  # boxes then removal
        g, n = r.randint(2, 12), _number(r, small) + 1
        k = r.randint(2, g * n)
        q = (
            f"There are {g} boxes with {n} {item} in each box. {name} takes away {k} {item}. "
            f"How many {item} are left?"
        )
        lines = [
            f"At first there are {g} * {n} = {g * n} {item}.",
            f"After taking away {k}, {g * n} - {k} = {g * n - k} {item} are left.",
        ]
        return q, lines, g * n - k
    if kind == 4:  # ages
        b = r.randint(3, 60)
        k = r.randint(1, 30)
        y = r.randint(1, 20)
        s = b + (b + k) + 2 * y
        q = (
            f"{name} is {k} years older than {other}. "
            f"In {y} years the sum of their ages will be {s}. "
            f"How old is {other_first} now?"
        )
        lines = [
            f"Let {other_first}'s age now be a. Then {first} is a + {k}.",
            f"In {y} years: (a + {y}) + (a + {k} + {y}) = {s}, so 2a + {k + 2 * y} = {s}.",
            f"Subtract {k + 2 * y}: 2a = {s} - {k + 2 * y} = {s - k - 2 * y}.",
            f"Divide by 2: a = {s - k - 2 * y} / 2 = {b}.",
        ]
        return q, lines, b
    # savings
    w, s = r.randint(2, 30), _number(r, small) + 1
    total = w * s
    q = (
        f"{name} saves {s} dollars every week. After how many weeks will {first} have saved "
        f"exactly {total} dollars?"
    )
    return q, [f"The number of weeks is {total} / {s} = {w}."], w


_KINDS = {
    "addition": (_addition, 3),
    "subtraction": (_subtraction, 3),
    "multiplication": (_multiplication, 3),
    "division": (_division, 2),
    "equation": (_equation, 3),
    "word": (_word, 4),
}
KINDS: tuple[str, ...] = tuple(_KINDS)


def _generate(r: random.Random, difficulty: int, kinds: tuple[str, ...]) -> MathProblem:
    weights = [_KINDS[k][1] for k in kinds]
    kind = r.choices(kinds, weights)[0]
    q, lines, ans = _KINDS[kind][0](r, difficulty)
    lines.append(f"Answer: {ans}")
    return MathProblem(question=q, solution="\n".join(lines), answer=str(ans), kind=kind)


def iter_math_problems(
    split: str = "train",
    seed: int = 0,
    difficulty: int | tuple[int, int] = 3,
    kinds: tuple[str, ...] | None = None,
) -> Iterator[MathProblem]:
    """An endless, deterministic stream of problems of `split` (difficulty: digits, or a
    (lo, hi) range)."""
    check_split(split)
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not (1 <= lo <= hi <= MAX_DIFFICULTY):
        raise ConfigError(f"difficulty must be digits in 1..{MAX_DIFFICULTY} (got {difficulty})")
    kinds = tuple(kinds) if kinds else KINDS
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown:
        raise ConfigError(f"unknown math problem kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    r = rng("k2-math", seed, split, lo, hi, ",".join(kinds))
    misses = 0
    while True:
        p = _generate(r, r.randint(lo, hi), kinds)
        if split_of(f"math:{p.question}", VAL_FRACTION, TEST_FRACTION) == split:
            misses = 0
            yield p
        else:
            misses += 1
            if misses > 10_000:
                raise ConfigError(f"too few distinct {split} problems at difficulty {difficulty}")


def math_problems(
    split: str = "train",
    seed: int = 0,
    n: int = 100,
    difficulty: int | tuple[int, int] = 3,
    kinds: tuple[str, ...] | None = None,
) -> list[MathProblem]:
    """`n` problems of `split` (train/val/test never share a question), seeded and deterministic."""
    it = iter_math_problems(split, seed, difficulty, kinds)
    return [next(it) for _ in range(n)]


def math_documents(
    *, split: str = "train", seed: int = 0, scale: float = 1.0
) -> Iterator[Document]:
    """Problems with worked solutions as documents; difficulty mixed over 1..5 digits."""
    check_split(split)
    check_scale(scale)
    frac = {"train": 1.0, "val": VAL_FRACTION, "test": TEST_FRACTION}[split]
    n = max(1, round(PROBLEMS_AT_SCALE_1 * scale * frac))
    for i, p in enumerate(iter_math_problems(split, seed, (1, 5))):
        if i >= n:
            break
        yield Document(id=f"math/{split}/{seed}/{i:07d}", text=p.text, domain="math")
