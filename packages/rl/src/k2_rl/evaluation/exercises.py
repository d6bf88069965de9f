"""Generated Python exercises for the `code` eval task: a function header with a docstring to
complete (HumanEval style, so a base model can answer) and assert-based tests.

Each exercise comes from a family with drawn constants and a drawn function name; its tests
call a reference implementation at generation time, and `reference` holds a correct body
(the tests check that every reference passes its own tests).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Exercise:
    """One exercise: the prompt to complete, its tests, and a correct body."""

    id: str
    name: str
    prompt: str  # `def name(args):\n    """doc"""\n`
    tests: tuple[str, ...]  # assert statements calling `name`
    reference: str  # a correct function body (indented)

    def program(self, completion: str) -> str:
        """The prompt, a completion of its body, and the tests, as one Python program."""
        return f"{self.prompt}{completion}\n\n" + "\n".join(self.tests) + "\n"


# A family: (name stems, args, docstring template, reference body template,
#            reference function maker, input maker), constants drawn per exercise.
_Family = tuple[
    tuple[str, ...],
    str,
    str,
    str,
    Callable[..., Callable[..., Any]],
    Callable[[random.Random], list[tuple[Any, ...]]],
]


def _ints(lo: int, hi: int, arity: int = 1) -> Callable[[random.Random], list[tuple[Any, ...]]]:
    return lambda r: [tuple(r.randint(lo, hi) for _ in range(arity)) for _ in range(3)]


def _lists(r: random.Random) -> list[tuple[Any, ...]]:
    return [([r.randint(-20, 50) for _ in range(r.randint(1, 6))],) for _ in range(3)]


def _words(r: random.Random) -> list[tuple[Any, ...]]:
    pool = ("apple", "banana", "cherry", "kiwi", "level", "python", "stone", "river", "sun")
    return [(r.choice(pool),) for _ in range(3)]


_FAMILIES: dict[str, _Family] = {
    "add_const": (
        ("add", "plus", "increase_by"),
        "x",
        "Return x plus {c}.",
        "    return x + {c}",
        lambda c: lambda x: x + c,
        _ints(-50, 50),
    ),
    "times_const": (
        ("times", "multiply_by", "scale"),
        "x",
        "Return x multiplied by {c}.",
        "    return x * {c}",
        lambda c: lambda x: x * c,
        _ints(-20, 20),
    ),
    "sum_two": (
        ("add_two", "sum_pair", "plus_both"),
        "a, b",
        "Return the sum of a and b.",
        "    return a + b",
        lambda c: lambda a, b: a + b,
        _ints(-100, 100, 2),
    ),
    "max_two": (
        ("larger", "bigger_of", "max_of_two"),
        "a, b",
        "Return the larger of a and b.",
        "    return a if a > b else b",
        lambda c: lambda a, b: max(a, b),
        _ints(-100, 100, 2),
    ),
    "square": (
        ("square", "squared", "sq"),
        "x",
        "Return x squared.",
        "    return x * x",
        lambda c: lambda x: x * x,
        _ints(-30, 30),
    ),
    "is_even": (
        ("is_even", "even", "check_even"),
        "n",
        "Return True if n is even, else False.",
        "    return n % 2 == 0",
        lambda c: lambda n: n % 2 == 0,
        _ints(-50, 50),
    ),
    "list_sum": (
        ("total", "sum_list", "add_all"),
        "xs",
        "Return the sum of the numbers in the list xs.",
        "    return sum(xs)",
        lambda c: lambda xs: sum(xs),
        _lists,
    ),
    "list_max": (
        ("largest", "max_item", "biggest"),
        "xs",
        "Return the largest number in the non-empty list xs.",
        "    return max(xs)",
        lambda c: lambda xs: max(xs),
        _lists,
    ),
    "list_len": (
        ("count_items", "length", "size_of"),
        "xs",
        "Return the number of items in the list xs.",
        "    return len(xs)",
        lambda c: lambda xs: len(xs),
        _lists,
    ),
    "reverse": (
        ("reverse", "reversed_text", "backwards"),
        "s",
        "Return the string s reversed.",
        "    return s[::-1]",
        lambda c: lambda s: s[::-1],
        _words,
    ),
    "upper": (
        ("shout", "to_upper", "upper_case"),
        "s",
        "Return the string s in upper case.",
        "    return s.upper()",
        lambda c: lambda s: s.upper(),
        _words,
    ),
    "first_char": (
        ("first_letter", "initial", "head_char"),
        "s",
        "Return the first character of the non-empty string s.",
        "    return s[0]",
        lambda c: lambda s: s[0],
        _words,
    ),
}


def generate_exercises(n: int, seed: int = 0) -> list[Exercise]:
    """`n` exercises, deterministic in `seed`, cycling over the families in a seeded order."""
    r = random.Random(f"k2-code-exercises:{seed}")
    fams = sorted(_FAMILIES)
    r.shuffle(fams)
    out = []
    for i in range(n):
        fam = fams[i % len(fams)]
        stems, args, doc, body, make, inputs = _FAMILIES[fam]
        c = r.randint(2, 9)
        name = f"{r.choice(stems)}_{i}"
        fn = make(c)
        tests = tuple(
            f"assert {name}({', '.join(repr(a) for a in xs)}) == {fn(*xs)!r}" for xs in inputs(r)
        )
        prompt = f'def {name}({args}):\n    """{doc.format(c=c)}"""\n'
        out.append(Exercise(f"{fam}/{seed}/{i}", name, prompt, tests, body.format(c=c)))
    return out


def cut_body(completion: str) -> str:
    """The completion up to the end of the function body: the first non-empty line that is
    not indented ends it (a base model goes on writing the next definition)."""
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        if i and line.strip() and not line[:1].isspace():
            return "\n".join(lines[:i]).rstrip()
    return completion.rstrip()
