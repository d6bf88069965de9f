"""Final answers of math responses: extraction and equivalence (math-verify, then sympy)."""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_HASH_RE = re.compile(r"####\s*([^\n]+)")
_LINE_RE = re.compile(
    r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE
)
_IS_RE = re.compile(r"answer\s+is\s*[:=]?\s*(.+?)(?:\n|$)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def _clean(ans: str) -> str:
    ans = ans.strip().strip("*").strip().rstrip(".").strip()
    return ans.strip("$").strip().rstrip(".").strip()  # $...$ around a plain answer


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer of `text`: boxed, '#### x', 'Answer: x', 'answer is x', else last number."""
    got = boxed(text)
    if got is None and (found := _HASH_RE.findall(text)):
        got = found[-1]
    if got is None and (found := _LINE_RE.findall(text)):
        got = found[-1]
    if got is None and (found := _IS_RE.findall(text)):
        got = found[-1]
    if got is None and last_number and (found := _NUMBER_RE.findall(text)):
        got = found[-1]
    if got is None:
        return None
    got = _clean(got)
    return got or None


def _plain(s: str) -> str:
    s = s.replace(",", "").replace(" ", "").replace("\\!", "").replace("$", "")
    s = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", s)
    return s[2:] if re.match(r"^[a-zA-Z]=", s) else s


def _fraction(s: str) -> Fraction | None:
    try:
        return Fraction(_plain(s))
    except (ValueError, ZeroDivisionError):
        return None


def _latex_to_sympy_text(s: str) -> str:
    s = _plain(s)
    for _ in range(4):  # nested fractions and roots
        s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\cdot", "*")
    s = s.replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    return s.replace("{", "(").replace("}", ")")


def sympy_equal(a: str, b: str) -> bool:
    """Equivalence by sympy: the difference simplifies to zero (False when either fails to
    parse)."""
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    tr = (*standard_transformations, implicit_multiplication_application)
    try:
        x = parse_expr(_latex_to_sympy_text(a), transformations=tr, evaluate=True)
        y = parse_expr(_latex_to_sympy_text(b), transformations=tr, evaluate=True)
        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # noqa: BLE001 - any parse/simplify failure means "not shown equal"
        return False


def _as_latex(s: str) -> str:
    return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"


def math_verify_equal(gold: str, pred: str, timeout_s: int = 5) -> bool | None:
    """Equivalence by math-verify; None when it cannot parse one side."""
    from math_verify import parse, verify

    # its timeouts use SIGALRM, which only the main thread may set
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(_as_latex(gold), parsing_timeout=t)
        p = parse(_as_latex(pred), parsing_timeout=t)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - math-verify failures fall back to sympy
        return None


def answers_equal(
    gold: str, pred: str, *, use_math_verify: bool = True, timeout_s: int = 5
) -> bool:
    """True when `pred` states the same value as `gold` (exact, numeric, math-verify, sympy)."""
    if _plain(gold) == _plain(pred):
        return True
    fg, fp = _fraction(gold), _fraction(pred)
    if fg is not None and fp is not None:
        return fg == fp
    if use_math_verify:
        got = math_verify_equal(gold, pred, timeout_s)
        if got is not None:
            return got
    return sympy_equal(gold, pred)
