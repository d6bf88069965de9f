"""Assert tests turned into calls across a plain-data boundary, and the two sandbox drivers.

The `code` reward never lets the answer and the test share an interpreter, and never lets an
expected value into the answer's sandbox:

- `plan_tests` reads each assert string with `ast`. `assert f(1, 2) == 3` (any one comparison
  of one call with literal arguments against a literal, a bare call, `not` a call) becomes a
  `Pair`: the call goes to the answer's sandbox, the expected literal stays in the parent,
  which compares the decoded result itself. Every other test runs as code in a sandbox of its
  own (`TEST_DRIVER`), where the solution's functions are proxies that answer from a memo of
  the answer's results, decoded plain data; a call the memo lacks stops the test, the parent
  asks the answer for it and runs the tests again.
- `ANSWER_DRIVER` loads the solution and calls it on decoded inputs. Its results, encoded by
  `plain`, go to the original stdout while the answer's own prints go to stderr. Whatever the
  answer writes there instead is only its own claim about its results: it cannot make a wrong
  result right without knowing the expected value, which it never sees.
"""

from __future__ import annotations

import ast
import builtins
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plain

_PLAIN_SOURCE = Path(plain.__file__).read_text(encoding="utf-8")
_BUILTIN_NAMES = frozenset(dir(builtins))
MAX_ROUNDS = 32  # test-driver rounds (one per call a test makes that no earlier round knew)

# Reads the calls from stdin, loads solution.py under the name "solution" (so a __main__
# block stays quiet), answers each call with an encoded result, error or missing name.
ANSWER_DRIVER = (
    _PLAIN_SOURCE
    + """
import os as _os, sys as _sys


def _k2_answer():
    spec = decode(_sys.stdin.read())
    out = _os.dup(1)  # the result stream: the original stdout
    _os.dup2(2, 1)  # the answer's own prints (print, sys.stdout, C code) go to stderr
    dumps, write = json.dumps, _os.write

    def emit(**rec):
        write(out, (dumps(rec) + "\\n").encode())

    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        with open("solution.py", encoding="utf-8") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
    except BaseException as e:
        emit(load=(type(e).__name__ + ": " + str(e))[:300])
        return 1
    for name in spec["require"]:
        if not callable(ns.get(name)):
            emit(missing=name)
            return 0
    for i, (name, args, kwargs) in enumerate(spec["calls"]):
        fn = ns.get(name)
        if not callable(fn):
            emit(i=i, missing=name)
            continue
        try:
            value = _enc(fn(*args, **kwargs), 0)
        except BaseException as e:
            emit(i=i, error=(type(e).__name__ + ": " + str(e))[:300])
            continue
        emit(i=i, ok=value)
    emit(done=len(spec["calls"]))
    return 0


_sys.exit(_k2_answer())
"""
)

# Runs the tests that are not pairs, with the solution's names bound to proxies answering
# from the memo; never sees the solution's code.
TEST_DRIVER = (
    _PLAIN_SOURCE
    + '''
import os as _os, sys as _sys


class _Need(BaseException):
    """A call the memo lacks: ends this test for this round (BaseException: no test catches it)."""


class SolutionError(Exception):
    """The solution raised, or its result or an argument was not plain data."""


def _k2_tests():
    spec = decode(_sys.stdin.read())
    memo = spec["memo"]
    out = _os.dup(1)  # the records: the original stdout
    _os.dup2(2, 1)  # what a test prints (perhaps the answer's values) goes to stderr

    def proxy(name):
        def call(*args, **kwargs):
            try:
                key = encode([name, list(args), kwargs])
            except PlainDataError as e:
                raise SolutionError("argument of %s() is not plain data: %s" % (name, e))
            if key not in memo:
                raise _Need(key)
            kind, value = memo[key]
            if kind != "ok":
                raise SolutionError(value)
            return decode(value)  # a fresh copy: a test may change what it got
        call.__name__ = name
        return call

    ns = {"__name__": "tests", "__builtins__": __builtins__}
    ns.update({name: proxy(name) for name in spec["names"]})
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, "test_%d" % i, "exec"), ns)
            rec = {"i": i, "result": "pass"}
        except _Need as e:
            rec = {"i": i, "need": e.args[0]}
        except AssertionError:
            rec = {"i": i, "result": "fail"}
        except BaseException as e:
            rec = {"i": i, "result": "error " + type(e).__name__}
        _os.write(out, (json.dumps(rec) + "\\n").encode())


_k2_tests()
'''
)


@dataclass(frozen=True)
class Pair:
    """An assert test decided in the parent: the answer's value of `call`, checked by `op`."""

    call: str  # plain.encode([name, args, kwargs]): the memo key
    op: str  # "==", "!=", "<", "<=", ">", ">=", "in", "not in", "is", "is not", "truthy", "falsy"
    expected: Any = None
    call_on_left: bool = True


@dataclass(frozen=True)
class TestPlan:
    """What the reward needs from the answer for one task's assert tests."""

    pairs: dict[int, Pair]  # test index -> pair, for the tests the parent decides
    code_tests: list[int]  # indices of the tests that run in the test driver
    calls: list[str]  # the calls known before any test runs (memo keys), in first-use order
    names: list[str]  # the solution's names the test code uses (proxied in the test driver)


_OPS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_MISSING = object()


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _bound_names(trees: list[ast.Module]) -> set[str]:
    """Names the tests bind themselves (assignments, imports, defs): never the solution's."""
    out: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                out.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.arg):
                out.add(node.arg)
    return out


def _static_call(node: ast.AST, solution: set[str]) -> str | None:
    """The memo key of `name(literal, ..., key=literal)` for a solution name, else None."""
    if not (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in solution
    ):
        return None
    args = [_literal(a) for a in node.args]
    if any(isinstance(a, ast.Starred) for a in node.args) or _MISSING in args:
        return None
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None or (value := _literal(kw.value)) is _MISSING:
            return None
        kwargs[kw.arg] = value
    try:
        return plain.encode([node.func.id, args, kwargs])
    except plain.PlainDataError:
        return None


def _pair(tree: ast.Module, solution: set[str]) -> Pair | None:
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    if (key := _static_call(test, solution)) is not None:
        return Pair(key, "truthy")
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        key = _static_call(test.operand, solution)
        return Pair(key, "falsy") if key is not None else None
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return None
    op = _OPS.get(type(test.ops[0]))
    left, right = test.left, test.comparators[0]
    for call_node, other, on_left in ((left, right, True), (right, left, False)):
        key = _static_call(call_node, solution)
        expected = _literal(other)
        if op is None or key is None or expected is _MISSING:
            continue
        if op in ("is", "is not") and not (expected is None or type(expected) is bool):
            return None  # identity with another literal means nothing across a boundary
        return Pair(key, op, expected, on_left)
    return None


def plan_tests(tests: list[str], entry: str | None) -> TestPlan:
    """Split assert tests into parent-decided pairs and code tests; list the calls to make."""
    trees: list[ast.Module | None] = []
    for t in tests:
        try:
            trees.append(ast.parse(t))
        except (SyntaxError, ValueError):
            trees.append(None)  # runs in the test driver, where it fails as the old harness did
    parsed = [t for t in trees if t is not None]
    bound = _bound_names(parsed)
    loaded = {
        n.id
        for tree in parsed
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    solution = {n for n in loaded if n not in bound and n not in _BUILTIN_NAMES}
    if entry:
        solution.add(entry)  # the entry point may shadow a builtin name (`sum`, `max`)
    pairs: dict[int, Pair] = {}
    calls: dict[str, None] = {}
    for i, tree in enumerate(trees):
        if tree is None:
            continue
        if (p := _pair(tree, solution)) is not None:
            pairs[i] = p
        for node in ast.walk(tree):
            if (key := _static_call(node, solution)) is not None:
                calls.setdefault(key)
    code_tests = [i for i in range(len(tests)) if i not in pairs]
    return TestPlan(pairs, code_tests, list(calls), sorted(solution))


def check_pair(pair: Pair, value: Any) -> str:
    """'pass', 'fail' or 'error T' for the answer's decoded `value` (plain data only)."""
    ops = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "in": lambda a, b: a in b,
        "not in": lambda a, b: a not in b,
        "is": lambda a, b: a is b,
        "is not": lambda a, b: a is not b,
    }
    try:
        if pair.op == "truthy":
            ok = bool(value)
        elif pair.op == "falsy":
            ok = not value
        elif pair.call_on_left:
            ok = bool(ops[pair.op](value, pair.expected))
        else:
            ok = bool(ops[pair.op](pair.expected, value))
    except Exception as e:  # noqa: BLE001 - e.g. `<` between a str and an int, as in the test
        return "error " + type(e).__name__
    return "pass" if ok else "fail"


@dataclass
class AnswerRun:
    """The decoded result stream of one answer-driver run."""

    load: str | None = None  # an error while loading the solution
    missing: str | None = None  # a required name the solution does not define
    results: dict[int, tuple[str, Any]] | None = None  # call index -> ("ok", value) | (kind, msg)
    done: bool = False
    corrupt: str = ""  # why the stream is not what the driver writes (the answer wrote to it)


def answer_stdin(calls: list[str], require: list[str]) -> str:
    """The answer driver's stdin: the calls as plain data (never an expected value)."""
    decoded = [plain.decode(c) for c in calls]
    return plain.encode({"calls": decoded, "require": require})


def parse_answer(stdout: str, n_calls: int) -> AnswerRun:
    """Read the answer driver's result stream strictly: records in order, each at most once."""
    run = AnswerRun(results={})
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # the answer may nest brackets 100,000 deep
            run.corrupt = "a result line is not JSON"
            break
        if not isinstance(rec, dict) or run.done or run.load or run.missing:
            run.corrupt = "unexpected result record"
            break
        if set(rec) == {"load"} and not run.results and isinstance(rec["load"], str):
            run.load = rec["load"]
        elif set(rec) == {"missing"} and not run.results and isinstance(rec["missing"], str):
            run.missing = rec["missing"]
        elif set(rec) == {"done"}:
            if rec["done"] != n_calls or len(run.results) != n_calls:
                run.corrupt = "the result count does not match the calls"
                break
            run.done = True
        elif (
            len(rec) == 2
            and rec.get("i") == len(run.results)
            and type(rec["i"]) is int
            and rec["i"] < n_calls
        ):
            kind = next(k for k in rec if k != "i")
            if kind == "ok":
                try:
                    run.results[rec["i"]] = ("ok", plain.decode_node(rec["ok"]))
                except plain.PlainDataError as e:
                    run.corrupt = f"a result is not plain data: {e}"
                    break
            elif kind in ("error", "missing") and isinstance(rec[kind], str):
                run.results[rec["i"]] = (kind, rec[kind])
            else:
                run.corrupt = "unexpected result record"
                break
        else:
            run.corrupt = "unexpected result record"
            break
    return run


def tests_stdin(
    tests: list[str], code_tests: list[int], names: list[str], memo: dict[str, tuple[str, Any]]
) -> str:
    """The test driver's stdin: its tests, the proxied names and the memo (values encoded)."""
    enc = {
        k: ["ok", plain.encode(v)] if kind == "ok" else [kind, str(v)]
        for k, (kind, v) in memo.items()
    }
    return plain.encode({"tests": [tests[i] for i in code_tests], "names": names, "memo": enc})


def parse_tests(stdout: str, n_tests: int) -> dict[int, dict]:
    """The test driver's records by test position (the test code is trusted: plain lines)."""
    out: dict[int, dict] = {}
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and type(rec.get("i")) is int and 0 <= rec["i"] < n_tests:
            out.setdefault(rec["i"], rec)
    return out
