"""The `code` reward: model-written Python run against the record's tests in the sandbox.

A record is {"prompt", "tests": [...], "entry_point"?}. Tests are either assert strings or
{"input", "output"} pairs (the solution runs once per pair with `input` on stdin; the parent
compares its stdout with `output` up to trailing whitespace). The verdict never depends on
anything the answer can reach: expected values never enter its sandbox, and every comparison
happens outside it on decoded plain data (see `code_calls` for how assert tests are split into
parent-decided calls and test code that reaches the answer only through a plain-data call
boundary). Outcomes: pass, wrong, timeout, runtime_error, sandbox_error; a sandbox_error is
excluded from the advantage, never scored as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2_core.errors import ConfigError

from ..sandbox import SandboxResult, run_python
from . import code_calls as cc
from .base import Reward, RewardResult, require
from .options import CodeRewardOptions

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE_RE = re.compile(r"```[^\n`]*\n(?:(?!```).)*\Z", re.DOTALL)
_CODE_LINE_RE = re.compile(r"^\s*(?:def|class|import|from|return)\b", re.MULTILINE)
_SOLUTION = "solution.py"
_BAD = {
    "timeout": "timeout",
    "runtime_error": "runtime_error",
    "memory_limit": "runtime_error",
    "output_limit": "runtime_error",
    "disk_limit": "runtime_error",
}


def extract_code(text: str, *, require_fence: bool = False) -> str | None:
    """The last ```python block of `text` (else the last fenced block, else the whole text when
    it looks like Python); a last fence left open (a truncated response) runs to the end."""
    if text.count("```") % 2 and (m := _OPEN_FENCE_RE.search(text)):
        text = text[: m.start()] + m.group(0) + "\n```"
    blocks = _FENCE_RE.findall(text)
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if py or blocks:
        return (py or [body for _, body in blocks])[-1]
    if require_fence:
        return None
    try:
        compile(text, "<response>", "exec")
    except (SyntaxError, ValueError):
        # broken Python still runs (and fails as a runtime error); prose is "no code"
        return text if _CODE_LINE_RE.search(text) else None
    return text


def _normal(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip().splitlines())


class CodeReward(Reward):
    """Run each response's Python against the record's tests in the sandbox."""

    name = "code"

    def __init__(self, options: CodeRewardOptions | None = None):
        self.options = options or CodeRewardOptions()

    def score(self, prompt: Mapping[str, Any], responses: Sequence[str]) -> list[RewardResult]:
        """Score every response; the sandboxed runs go `workers` at a time."""
        tests = list(require(prompt, "tests", self.name))
        kind = _test_kind(tests)
        entry = prompt.get("entry_point")
        codes = [extract_code(r, require_fence=self.options.require_fence) for r in responses]
        with ThreadPoolExecutor(self.options.workers) as pool:
            if kind == "io":
                jobs = [
                    (i, t) for i, c in enumerate(codes) if c is not None for t in range(len(tests))
                ]
                runs = list(pool.map(lambda job: self._run_io(codes[job[0]], tests[job[1]]), jobs))
                by_response: dict[int, list[SandboxResult]] = {}
                for (i, _), res in zip(jobs, runs, strict=True):
                    by_response.setdefault(i, []).append(res)
                scored = {i: self._io_result(r, tests) for i, r in by_response.items()}
            else:
                plan = cc.plan_tests(tests, entry)
                todo = [i for i, c in enumerate(codes) if c is not None]
                results = pool.map(
                    lambda i: self._assert_result(codes[i], tests, entry, plan), todo
                )
                scored = dict(zip(todo, results, strict=True))
        return [
            scored.get(i) or RewardResult(0.0, "wrong", detail="no code in the response")
            for i in range(len(codes))
        ]

    def _run_io(self, code: str, test: Mapping[str, Any]) -> SandboxResult:
        return run_python(code, stdin=str(test["input"]), limits=self.options.sandbox)

    def _score(self, passed: int, total: int) -> float:
        if self.options.partial_credit:
            return passed / max(total, 1)
        return 1.0 if passed == total else 0.0

    def _io_result(self, runs: list[SandboxResult], tests: list[dict]) -> RewardResult:
        outcomes = []
        for res, test in zip(runs, tests, strict=True):
            if res.outcome == "ok":
                same = _normal(res.stdout) == _normal(str(test["output"]))
                outcomes.append("pass" if same else "wrong")
            else:
                outcomes.append(_BAD.get(res.outcome, "sandbox_error"))
        if "sandbox_error" in outcomes:
            err = next(r.error for r in runs if r.outcome == "sandbox_error")
            return RewardResult(0.0, "sandbox_error", excluded=True, detail=err)
        passed = outcomes.count("pass")
        worst = next((o for o in ("timeout", "runtime_error", "wrong") if o in outcomes), "pass")
        return RewardResult(
            self._score(passed, len(tests)), worst, detail=f"{passed}/{len(tests)} tests passed"
        )

    def _ask_answer(
        self, code: str, calls: list[str], entry: str | None, memo: dict[str, tuple[str, Any]]
    ) -> tuple[SandboxResult, RewardResult | None]:
        """Run the answer on `calls` and add its results to `memo`; a verdict when it ends here."""
        stdin = cc.answer_stdin(calls, [entry] if entry else [])
        res = run_python(
            cc.ANSWER_DRIVER, stdin=stdin, limits=self.options.sandbox, files={_SOLUTION: code}
        )
        if res.outcome == "sandbox_error":
            return res, RewardResult(0.0, "sandbox_error", excluded=True, detail=res.error)
        got = cc.parse_answer(res.stdout, len(calls))
        if got.corrupt:
            return res, RewardResult(
                0.0, "runtime_error", detail=f"the result stream was written to: {got.corrupt}"
            )
        if got.load is not None:
            return res, RewardResult(0.0, "runtime_error", detail=got.load)
        if got.missing is not None:
            return res, RewardResult(0.0, "wrong", detail=f"no function {got.missing!r} defined")
        if res.outcome == "ok" and not got.done:
            return res, RewardResult(
                0.0, "runtime_error", detail="the program ended before its tests"
            )
        for i, key in enumerate(calls):
            memo[key] = got.results.get(i, ("error", f"{res.outcome}: {res.error}"))
        return res, None

    def _assert_result(
        self, code: str, tests: list[str], entry: str | None, plan: cc.TestPlan
    ) -> RewardResult:
        memo: dict[str, tuple[str, Any]] = {}
        res, verdict = self._ask_answer(code, plan.calls, entry, memo)
        if verdict is not None:
            return verdict
        worst = res
        results: dict[int, str] = {}
        for i, pair in plan.pairs.items():
            kind, value = memo[pair.call]
            results[i] = (
                cc.check_pair(pair, value)
                if kind == "ok"
                else f"error {str(value).split(':')[0]}"
                if kind == "error"
                else f"error no function {value!r}"
            )
        for round_ in range(cc.MAX_ROUNDS + 1):
            if not plan.code_tests:
                break
            stdin = cc.tests_stdin(tests, plan.code_tests, plan.names, memo)
            tres = run_python(cc.TEST_DRIVER, stdin=stdin, limits=self.options.sandbox)
            if tres.outcome == "sandbox_error":
                return RewardResult(0.0, "sandbox_error", excluded=True, detail=tres.error)
            recs = cc.parse_tests(tres.stdout, len(plan.code_tests))
            needs = list(
                dict.fromkeys(
                    r["need"] for r in recs.values() if "need" in r and isinstance(r["need"], str)
                )
            )
            if needs and round_ < cc.MAX_ROUNDS and worst.outcome == "ok":
                res, verdict = self._ask_answer(code, needs, entry, memo)
                if verdict is not None:
                    return verdict
                worst = res if res.outcome != "ok" else worst
                continue
            for pos, i in enumerate(plan.code_tests):
                rec = recs.get(pos, {})
                results[i] = (
                    rec.get("result")
                    if isinstance(rec.get("result"), str)
                    else (
                        "error the test asked for too many calls"
                        if "need" in rec
                        else f"error {tres.outcome}"
                    )
                )
            break
        passed = sum(r == "pass" for r in results.values())
        total = len(tests)
        if worst.outcome != "ok":
            partial = passed / total if self.options.partial_credit else 0.0
            return RewardResult(
                partial,
                _BAD.get(worst.outcome, "runtime_error"),
                detail=f"{worst.outcome}: {worst.error}; {passed}/{total} tests passed",
            )
        if passed == total:
            return RewardResult(
                self._score(passed, total), "pass", detail=f"{total}/{total} tests passed"
            )
        errors = [r for r in results.values() if r.startswith("error")]
        return RewardResult(
            self._score(passed, total),
            "runtime_error" if errors else "wrong",
            detail=f"{passed}/{total} tests passed" + (f"; {errors[0]}" if errors else ""),
        )


def _test_kind(tests: list) -> str:
    if not tests:
        raise ConfigError(
            "task record for reward 'code' has an empty 'tests' list; give at "
            "least one assert string or {input, output} pair"
        )
    if all(isinstance(t, str) for t in tests):
        return "assert"
    if all(isinstance(t, Mapping) and {"input", "output"} <= set(t) for t in tests):
        return "io"
    raise ConfigError(
        "task record for reward 'code': 'tests' must be all assert strings or "
        "all {'input': ..., 'output': ...} pairs"
    )


def build_code_reward(*, options: CodeRewardOptions) -> CodeReward:
    """Model-written Python run against test cases in the sandbox; sandbox errors excluded."""
    return CodeReward(options)
