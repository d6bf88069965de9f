"""Answers that attack the `code` reward's verdict: each scores 0; honest answers still score 1.

The verdict must never depend on anything the answer can reach. Each attack below defines a wrong
`add` (or none) and then tries to make the tests pass anyway: forged reports, a patched
`compile`/`exec`/`json`/`sys.stdout`, exit codes, `atexit`, `sys.excepthook`, results whose
`__eq__` is always true. The honest half checks that the parent's comparison on decoded plain
data means what the test meant (tuple vs list, int vs float vs bool, NaN, sets, dict key types).
"""

from __future__ import annotations

import math

import pytest
from k2_rl.rewards import code_reward
from k2_rl.rewards.code_reward import CodeReward
from k2_rl.rewards.options import CodeRewardOptions

TASK = {
    "prompt": "Write add(a, b).",
    "entry_point": "add",
    "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"],
}
FAST = {"wall_s": 5.0, "cpu_s": 3}

# finds the harness's per-run tag (and the tests) in a calling frame, prints forged reports
_FRAME_FORGERY = """
import json, os, sys
f = sys._getframe()
while f is not None and "tag" not in f.f_locals:
    f = f.f_back
if f is not None:
    tag, n = f.f_locals["tag"], len(f.f_locals.get("tests", ()))
    out = sys.__stdout__
    out.write("\\n" + tag + json.dumps({"load": "ok"}) + "\\n")
    for i in range(n):
        out.write("\\n" + tag + json.dumps({"test": i, "result": "pass"}) + "\\n")
    out.flush()
os._exit(0)
"""
_WRONG = "def add(a, b):\n    return a * 1000 + 7\n"  # wrong on every test
_ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
"""
ATTACKS = {
    "frame_tag_forgery": _FRAME_FORGERY,
    "frame_tag_forgery_with_wrong_add": _WRONG + _FRAME_FORGERY,
    "compile_replaced": (
        "import builtins\n_c = builtins.compile\n"
        "builtins.compile = lambda src, name, mode, *a, **k: "
        "_c('pass', name, mode)\n" + _WRONG
    ),
    "exec_replaced": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + _WRONG,
    "eq_always_true": _ALWAYS_EQUAL,
    "int_subclass_eq_always_true": (
        "class I(int):\n    def __eq__(self, o):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n"
    ),
    "fake_class_property": (
        "class Liar:\n    __class__ = property(lambda self: int)\n"
        "    def __eq__(self, o):\n        return True\n"
        "def add(a, b):\n    return Liar()\n"
    ),
    "json_dumps_patched": (
        "import json\n_d = json.dumps\n"
        "def dumps(obj, *a, **k):\n"
        "    if isinstance(obj, dict) and 'test' in obj:\n"
        "        obj = {**obj, 'result': 'pass'}\n"
        "    return _d(obj, *a, **k)\n"
        "json.dumps = dumps\n" + _WRONG
    ),
    "stdout_write_patched": (
        "import sys\n_w = sys.stdout.write\n"
        "sys.stdout.write = lambda s: _w(s.replace('\"fail\"', '\"pass\"'))\n" + _WRONG
    ),
    "print_and_stdout_replaced": (
        "import builtins, io, sys\n"
        "builtins.print = lambda *a, **k: None\n"
        "sys.stdout = io.StringIO()\n" + _WRONG
    ),
    "atexit_forgery": (
        "import atexit, json, sys\n"
        "f = sys._getframe()\n"
        "while f is not None and 'tag' not in f.f_locals:\n"
        "    f = f.f_back\n"
        "tag = f.f_locals['tag'] if f else '@@k2-0@@'\n"
        "def forge():\n"
        "    for i in range(3):\n"
        "        sys.__stdout__.write('\\n' + tag + json.dumps("
        "{'test': i, 'result': 'pass'}) + '\\n')\n"
        "    sys.__stdout__.flush()\n"
        "atexit.register(forge)\n" + _WRONG
    ),
    "excepthook_and_exit_zero": (
        "import atexit, os, sys\n"
        "sys.excepthook = lambda *a: os._exit(0)\n"
        "atexit.register(lambda: os._exit(0))\n"
        "def add(a, b):\n    raise RuntimeError('no')\n"
    ),
    "exit_zero_before_tests": "import os\nos._exit(0)\n",
    # a result line nested far deeper than any decoder recurses, on every descriptor
    "deeply_nested_result_line": (
        "import os\nline = ('[' * 200000 + ']' * 200000 + '\\n')"
        ".encode()\nfor fd in (1, 3, 4):\n    try:\n"
        "        os.write(fd, line)\n    except OSError:\n"
        "        pass\n" + _WRONG
    ),
    "sys_exit_zero_in_function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    # forged result lines in guessed formats on every descriptor it can write to
    "forged_guessed_formats": (
        "import json, os\n"
        "lines = []\n"
        "for i in range(3):\n"
        "    for rec in ({'test': i, 'result': 'pass'}, {'i': i, 'ok': True},\n"
        "                {'call': i, 'value': ['i', '0x3']}, {'i': i, 'ok': ['b', True]},\n"
        "                ['ok', i], {'result': 'pass'}):\n"
        "        lines.append(json.dumps(rec))\n"
        "blob = ('\\n'.join(lines) + '\\n').encode()\n"
        "for fd in range(0, 64):\n"
        "    try:\n"
        "        os.write(fd, blob)\n"
        "    except OSError:\n"
        "        pass\n" + _WRONG
    ),
}


def _fence(body: str) -> str:
    return f"```python\n{body}\n```"


def _reward(**kw) -> CodeReward:
    return CodeReward(CodeRewardOptions(sandbox=FAST, **kw))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero(name):
    res = _reward().score(TASK, [_fence(ATTACKS[name])])[0]
    assert res.score == 0.0, (name, res)
    assert res.outcome != "pass" and not res.excluded, (name, res)


@pytest.mark.parametrize(
    "name",
    [
        "eq_always_true",
        "compile_replaced",
        "json_dumps_patched",
        "frame_tag_forgery_with_wrong_add",
    ],
)
def test_attack_scores_zero_with_partial_credit(name):
    res = _reward(partial_credit=True).score(TASK, [_fence(ATTACKS[name])])[0]
    assert res.score == 0.0, (name, res)


def test_forging_the_new_result_stream_gains_nothing():
    # writes well-formed records of the real driver's format, in order, then exits 0: they are
    # the answer's own claims (it never saw the expected values), so wrong claims score 0
    forge = (
        "import json, os, sys\n"
        "recs = [json.dumps({'i': i, 'ok': ['i', '0x0']}) for i in range(3)]\n"
        "for fd in (1, 3, 4, 5):\n"
        "    try:\n"
        "        os.write(fd, ('\\n'.join(recs) + '\\n').encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    res = _reward(partial_credit=True).score(TASK, [_fence(forge)])[0]
    assert res.score == 0.0 and res.outcome != "pass"


def test_honest_answers_still_score_one():
    honest = [
        "def add(a, b):\n    return a + b\n",
        "import sys\ndef add(a, b):\n    print('debug', a, b)\n    return a + b\n",
        'def add(a, b):\n    print(\'{"test": 0, "result": "fail"}\')\n    return b + a\n',
        "import json\njson.dumps = None\ndef add(a, b):\n    return sum([a, b])\n",
        "def add(a, b):\n    return add_(a, b)\ndef add_(a, b):\n    return a + b\n",
    ]
    res = _reward().score(TASK, [_fence(h) for h in honest])
    assert [r.score for r in res] == [1.0] * len(honest), res
    assert all(r.outcome == "pass" for r in res)


def _one(tests: list[str], body: str, entry: str | None = None, **kw) -> float:
    task = {"prompt": "p", "tests": tests, **({"entry_point": entry} if entry else {})}
    return _reward(**kw).score(task, [_fence(body)])[0].score


@pytest.mark.parametrize(
    ("test", "body", "want"),
    [
        ("assert pair(1) == (1, 2)", "def pair(x):\n    return (x, x + 1)", 1.0),
        ("assert pair(1) == (1, 2)", "def pair(x):\n    return [x, x + 1]", 0.0),  # list != tuple
        (
            "assert pair(1) == (1, 2)",
            "import collections\nP = collections.namedtuple('P', 'a b')\n"
            "def pair(x):\n    return P(x, x + 1)",
            1.0,
        ),  # a namedtuple == tuple in Python
        ("assert half(4) == 2", "def half(x):\n    return x / 2", 1.0),  # 2.0 == 2
        ("assert half(4) == 2", "def half(x):\n    return '2'", 0.0),
        ("assert half(4) == 2.5", "def half(x):\n    return x // 2", 0.0),
        ("assert flag(1) == True", "def flag(x):\n    return 1", 1.0),  # 1 == True in Python
        ("assert flag(1) is True", "def flag(x):\n    return 1", 0.0),  # but 1 is not True
        ("assert flag(1) is True", "def flag(x):\n    return x == 1", 1.0),
        ("assert keys() == {1: 'a'}", "def keys():\n    return {'1': 'a'}", 0.0),  # key types
        ("assert keys() == {1: 'a'}", "def keys():\n    return {1: 'a'}", 1.0),
        (
            "assert keys() == {1: 'a'}",
            "import collections\ndef keys():\n    return collections.OrderedDict([(1, 'a')])",
            1.0,
        ),
        ("assert uniq([1, 1, 2]) == {1, 2}", "def uniq(x):\n    return set(x)", 1.0),
        ("assert uniq([1, 1, 2]) == {1, 2}", "def uniq(x):\n    return frozenset(x)", 1.0),
        ("assert uniq([1, 1, 2]) == {1, 2}", "def uniq(x):\n    return sorted(set(x))", 0.0),
        ("assert nan() == 1.0", "def nan():\n    return float('nan')", 0.0),
        ("assert big(100) == 2 ** 100", "def big(n):\n    return 2 ** n", 1.0),
        ("assert big(10) == 1024", "def big(n):\n    return 1 << n", 1.0),
        ("assert none(0) is None", "def none(x):\n    pass", 1.0),
        ("assert none(0) is None", "def none(x):\n    return 0", 0.0),
        ("assert not odd(2)", "def odd(x):\n    return x % 2", 1.0),
        ("assert odd(3)", "def odd(x):\n    return x % 2", 1.0),
        ("assert odd(3)", "def odd(x):\n    return 0", 0.0),
        ("assert rev(b'ab') == b'ba'", "def rev(b):\n    return b[::-1]", 1.0),
        ("assert rev('ab') != 'ab'", "def rev(s):\n    return s[::-1]", 1.0),
        ("assert lst(x=2) == [0, 1]", "def lst(x):\n    return list(range(x))", 1.0),
        ("assert 3 == add(1, 2)", "def add(a, b):\n    return a + b", 1.0),
        ("assert add(1, 2) in (3, 4)", "def add(a, b):\n    return a + b", 1.0),
        ("assert cplx(1) == 1 + 2j", "def cplx(x):\n    return complex(x, 2)", 1.0),
    ],
)
def test_parent_comparison_means_what_the_test_meant(test, body, want):
    assert _one([test], body) == want


@pytest.mark.parametrize(
    ("tests", "body"),
    [
        (["assert sorted(f([3, 1, 2])) == [1, 2, 3]"], "def f(x):\n    return list(reversed(x))"),
        (["assert f(f(2)) == 16"], "def f(x):\n    return x * x"),
        (["r = f(3)\nassert r[0] < r[1]"], "def f(x):\n    return (x, x + 1)"),
        (
            ["assert abs(area(2.0) - 12.566) < 1e-3"],
            "import math\ndef area(r):\n    return math.pi * r * r",
        ),
        (
            ["assert f(2) + g(3) == 8", "assert g(0) == 1"],
            "def f(x):\n    return x * 2\ndef g(x):\n    return x + 1",
        ),
        (
            [
                "def check(candidate):\n    assert candidate(1) == 2\n"
                "    assert candidate(5) == 6\n"
                "    assert candidate(-1) == 0\ncheck(f)"
            ],
            "def f(x):\n    return x + 1",
        ),
    ],
)
def test_assertions_that_are_not_pairs_run_through_a_call_boundary(tests, body):
    assert _one(tests, body) == 1.0
    assert (
        _one(tests, _ALWAYS_EQUAL.replace("def add(a, b)", "def f(*a)") + "\ng = area = f\n") == 0.0
    )


def test_call_boundary_errors_and_missing_functions_are_failures():
    assert _one(["assert sorted(f([1])) == [1]"], "def f(x):\n    raise ValueError(x)") == 0.0
    assert _one(["assert sorted(f([1])) == [1]"], "def g(x):\n    return x") == 0.0
    assert _one(["assert len(f(2)) == 2"], "def f(x):\n    return object()") == 0.0


def test_expected_values_never_enter_the_answers_sandbox(monkeypatch):
    seen: list[str] = []
    real = code_reward.run_python

    def spy(code, stdin=None, *, limits=None, files=None):
        seen.append(code + str(stdin) + "".join(str(v) for v in (files or {}).values()))
        return real(code, stdin, limits=limits, files=files)

    monkeypatch.setattr(code_reward, "run_python", spy)
    task = {
        "prompt": "p",
        "entry_point": "f",
        "tests": [
            "assert f(7) == 918273645",
            "assert f(8) == (564738291, 'zyxwvu')",
            "assert f(7) - 1 == 918273644",
        ],
    }  # the last one is not a pair
    body = "def f(x):\n    return 918273645 if x == 7 else (564738291, 'zyxwvu')"
    res = _reward().score(task, [_fence(body)])[0]
    assert res.score == 1.0
    answer_runs = [s for s in seen if "def f(x)" in s]
    test_runs = [s for s in seen if "def f(x)" not in s]
    assert answer_runs and test_runs  # the third test ran in a sandbox of its own
    for s in answer_runs:
        assert s.count("918273645") == 1 and s.count("zyxwvu") == 1  # only the answer's own
        assert "918273644" not in s
    assert all("def f(x)" not in s and "918273644" in s for s in test_runs)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**5000,
        -(2**70),
        1.5,
        -0.0,
        float("inf"),
        float("-inf"),
        "x",
        "\ud800 lone surrogate",
        b"\x00\xff",
        bytearray(b"ab"),
        (1, [2, (3,)]),
        [],
        (),
        {1: "a", "1": "b", (1, 2): None, False: 3.0, 2.5: b""},
        {1, 2},
        frozenset({(1, 2)}),
        1 + 2j,
        [{"nested": [set(), frozenset()]}],
    ],
)
def test_plain_encoding_round_trips_with_types(value):
    from k2_rl.rewards.plain import decode, encode

    back = decode(encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in back] == [type(k) for k in value]


def test_plain_encoding_keeps_nan_and_refuses_behaviour():
    from k2_rl.rewards.plain import PlainDataError, decode, encode

    assert math.isnan(decode(encode(float("nan"))))
    assert math.copysign(1, decode(encode(-0.0))) == -1
    for bad in (object(), lambda: 1, type, iter([1])):
        with pytest.raises(PlainDataError):
            encode(bad)
    deep: list = []
    for _ in range(400):
        deep = [deep]
    with pytest.raises(PlainDataError):
        encode(deep)
    for text in ('["q", 1]', '["i", "12x"]', "[", '{"a": 1}', '["l", 5]', '["d", [[1]]]'):
        with pytest.raises(PlainDataError):
            decode(text)
