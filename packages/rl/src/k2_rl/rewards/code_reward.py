"""The `code` reward: model-written Python run against the record's tests in the sandbox.

A record is {"prompt", "tests": [...], "entry_point"?}. Tests are either assert statements
(strings, run after the solution in one sandboxed process) or {"input", "output"} pairs (the
solution runs once per pair with `input` on stdin; its stdout must equal `output` up to
trailing whitespace). Outcomes: pass, wrong, timeout, runtime_error, sandbox_error; a
sandbox_error is excluded from the advantage, never scored as wrong.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2_core.errors import ConfigError

from ..sandbox import SandboxResult, run_python
from .base import Reward, RewardResult, require
from .options import CodeRewardOptions

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE_RE = re.compile(r"```[^\n`]*\n(?:(?!```).)*\Z", re.DOTALL)
_CODE_LINE_RE = re.compile(r"^\s*(?:def|class|import|from|return)\b", re.MULTILINE)
_SOLUTION = "solution.py"
# Runs the solution in its own namespace, then each assert test; reports each step on stdout
# behind a tag read from stdin before the solution starts, so printed text cannot pose as one.
_HARNESS = """\
import json, sys
def _k2_main():
    tag = sys.stdin.readline().strip()
    tests = json.loads(sys.stdin.readline())
    entry = json.loads(sys.stdin.readline())
    out = sys.stdout
    def report(**kw):
        out.write("\\n" + tag + json.dumps(kw) + "\\n")
        out.flush()
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        with open("solution.py", encoding="utf-8") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
    except BaseException as e:
        report(load=(type(e).__name__ + ": " + str(e))[:300])
        return 1
    if entry and not callable(ns.get(entry)):
        report(load="missing " + entry)
        return 0
    report(load="ok")
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "test_%d" % i, "exec"), ns)
            result = "pass"
        except AssertionError:
            result = "fail"
        except BaseException as e:
            result = "error " + type(e).__name__
        report(test=i, result=result)
    return 0
sys.exit(_k2_main())
"""
_BAD = {"timeout": "timeout", "runtime_error": "runtime_error", "memory_limit": "runtime_error",
        "output_limit": "runtime_error"}


def extract_code(text: str, *, require_fence: bool = False) -> str | None:
    """The last ```python block of `text` (else the last fenced block, else the whole text when
    it looks like Python); a last fence left open (a truncated response) runs to the end."""
    if text.count("```") % 2 and (m := _OPEN_FENCE_RE.search(text)):
        text = text[:m.start()] + m.group(0) + "\n```"
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
        jobs = [(i, t) for i, c in enumerate(codes) if c is not None
                for t in (range(len(tests)) if kind == "io" else [None])]
        with ThreadPoolExecutor(self.options.workers) as pool:
            runs = list(pool.map(lambda job: self._run(codes[job[0]], tests, entry, job[1]), jobs))
        by_response: dict[int, list[SandboxResult]] = {}
        for (i, _), res in zip(jobs, runs, strict=True):
            by_response.setdefault(i, []).append(res)
        out = []
        for i, code in enumerate(codes):
            if code is None:
                out.append(RewardResult(0.0, "wrong", detail="no code in the response"))
            elif kind == "io":
                out.append(self._io_result(by_response[i], tests))
            else:
                out.append(self._assert_result(by_response[i][0], len(tests)))
        return out

    def _run(self, code: str, tests: list, entry: str | None, io_index: int | None
             ) -> SandboxResult | tuple[SandboxResult, str]:
        limits = self.options.sandbox
        if io_index is not None:
            return run_python(code, stdin=str(tests[io_index]["input"]), limits=limits)
        tag = f"@@k2-{secrets.token_hex(8)}@@"
        stdin = f"{tag}\n{json.dumps(tests)}\n{json.dumps(entry)}\n"
        res = run_python(_HARNESS, stdin=stdin, limits=limits, files={_SOLUTION: code})
        return res, tag

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
        return RewardResult(self._score(passed, len(tests)), worst,
                            detail=f"{passed}/{len(tests)} tests passed")

    def _assert_result(self, run: tuple[SandboxResult, str], total: int) -> RewardResult:
        res, tag = run
        if res.outcome == "sandbox_error":
            return RewardResult(0.0, "sandbox_error", excluded=True, detail=res.error)
        reports = [r for line in res.stdout.splitlines() if line.startswith(tag)
                   if (r := _report(line[len(tag):])) is not None]
        load = next((r["load"] for r in reports if "load" in r), None)
        results = [r["result"] for r in reports if "test" in r]
        passed = results.count("pass")
        score = self._score(passed, total)
        if res.outcome != "ok":
            why = load if load not in (None, "ok") else f"{res.outcome}: {res.error}"
            detail = f"{why}; {passed}/{total} tests passed"
            partial = passed / total if self.options.partial_credit else 0.0
            return RewardResult(partial, _BAD.get(res.outcome, "runtime_error"),
                                detail=detail)
        if load is None:
            return RewardResult(0.0, "runtime_error", detail="the program ended before its tests")
        if load.startswith("missing "):
            return RewardResult(0.0, "wrong", detail=f"no function {load[8:]!r} defined")
        if load != "ok":
            return RewardResult(0.0, "runtime_error", detail=load)
        if len(results) < total:
            return RewardResult(score, "runtime_error", detail="the tests did not all run")
        if passed == total:
            return RewardResult(score, "pass", detail=f"{total}/{total} tests passed")
        errors = [r for r in results if r.startswith("error")]
        return RewardResult(score, "runtime_error" if errors else "wrong",
                            detail=f"{passed}/{total} tests passed"
                            + (f"; {errors[0]}" if errors else ""))


def _report(text: str) -> dict | None:
    try:
        got = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut by the output cap
    return got if isinstance(got, dict) else None


def _test_kind(tests: list) -> str:
    if not tests:
        raise ConfigError("task record for reward 'code' has an empty 'tests' list; give at "
                          "least one assert string or {input, output} pair")
    if all(isinstance(t, str) for t in tests):
        return "assert"
    if all(isinstance(t, Mapping) and {"input", "output"} <= set(t) for t in tests):
        return "io"
    raise ConfigError("task record for reward 'code': 'tests' must be all assert strings or "
                      "all {'input': ..., 'output': ...} pairs")


def build_code_reward(*, options: CodeRewardOptions) -> CodeReward:
    """Model-written Python run against test cases in the sandbox; sandbox errors excluded."""
    return CodeReward(options)
