"""The `code` reward: extraction, each outcome, partial credit, stdin/stdout tests, exclusion."""

from __future__ import annotations

import pytest
from k2_core.errors import ConfigError
from k2_rl.rewards.code_reward import CodeReward, extract_code
from k2_rl.rewards.options import CodeRewardOptions

TASK = {
    "prompt": "Write add(a, b).",
    "entry_point": "add",
    "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"],
}
FAST = {"wall_s": 3.0, "cpu_s": 2}


def _fence(body: str) -> str:
    return f"Here you go:\n```python\n{body}\n```\nDone."


def test_extract_code():
    assert extract_code(_fence("x = 1")) == "x = 1\n"
    two = "```text\nnot code\n```\n```py\na = 1\n```\n```\nb = 2\n```"
    assert extract_code(two) == "a = 1\n"  # the last python block wins over untagged ones
    assert extract_code("```\nb = 2\n```") == "b = 2\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("I think the answer is f(x).") is None
    assert extract_code("x = 1", require_fence=True) is None
    assert extract_code("Sure:\n```python\ndef f():\n    return 1") == "def f():\n    return 1\n"
    assert extract_code("def f(:\n    return 1") == "def f(:\n    return 1"  # runs, fails


def test_outcomes_of_assert_tests():
    reward = CodeReward(CodeRewardOptions(sandbox=FAST))
    responses = [
        _fence("def add(a, b):\n    return a + b"),
        _fence("def add(a, b):\n    return a - b"),
        _fence("def add(a, b):\n    return a + b.value"),
        _fence("def add(a, b):\n    while True:\n        pass"),
        _fence("import sys\nsys.exit(0)"),
        _fence("def plus(a, b):\n    return a + b"),
        "no code here, sorry",
        "def add(a, b)\n    return a + b",
    ]
    res = reward.score(TASK, responses)
    assert [r.outcome for r in res] == [
        "pass",
        "wrong",
        "runtime_error",
        "timeout",
        "runtime_error",
        "wrong",
        "wrong",
        "runtime_error",
    ]
    assert [r.score for r in res] == [1.0, 0, 0, 0, 0, 0, 0, 0]
    assert "SyntaxError" in res[7].detail
    assert not any(r.excluded for r in res)
    assert "AttributeError" in res[2].detail and "'add'" in res[5].detail


def test_printed_fake_reports_do_not_pass():
    fake = _fence(
        'print(\'@@k2-0000@@{"test": 0, "result": "pass"}\')\ndef add(a, b):\n    return 0'
    )
    res = CodeReward(CodeRewardOptions(sandbox=FAST)).score(TASK, [fake])[0]
    assert res.outcome == "wrong" and res.score == 0.0


def test_partial_credit():
    half = _fence("def add(a, b):\n    return a + b if a > 0 else None")
    res = CodeReward(CodeRewardOptions(partial_credit=True, sandbox=FAST)).score(TASK, [half])[0]
    assert res.outcome == "wrong" and res.score == pytest.approx(2 / 3)


def test_stdin_stdout_tests():
    task = {
        "prompt": "Print twice the number.",
        "tests": [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10"}],
    }
    reward = CodeReward(CodeRewardOptions(partial_credit=True, sandbox=FAST))
    res = reward.score(
        task,
        [
            _fence("print(int(input()) * 2)   "),
            _fence("print(int(input()) + 3)"),
            _fence("raise ValueError('no')"),
            _fence("import time\ntime.sleep(10)"),
        ],
    )
    assert [r.outcome for r in res] == ["pass", "wrong", "runtime_error", "timeout"]
    assert [r.score for r in res] == [1.0, 0.5, 0.0, 0.0]


def test_sandbox_errors_are_excluded_not_wrong(tmp_path):
    broken = CodeRewardOptions(sandbox={**FAST, "python": str(tmp_path / "missing-python")})
    res = CodeReward(broken).score(TASK, [_fence("def add(a, b):\n    return a + b")])[0]
    assert res.excluded and res.outcome == "sandbox_error" and res.score == 0.0


def test_bad_task_records():
    reward = CodeReward()
    with pytest.raises(ConfigError, match="tests"):
        reward.score({"prompt": "p"}, ["x"])
    with pytest.raises(ConfigError, match="empty"):
        reward.score({"tests": []}, ["x"])
    with pytest.raises(ConfigError, match="all assert strings"):
        reward.score({"tests": ["assert 1", {"input": ""}]}, ["x"])


def test_attacks_score_as_failures_never_excluded():
    task = {"prompt": "Print 1.", "tests": [{"input": "", "output": "1"}]}
    attacks = [
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "x = bytearray(8 << 30)\nprint(1)",
        "import sys\nsys.stdout.write('1' * 100_000_000)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\nprint(1)",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(1)",
    ]
    opts = CodeRewardOptions(
        sandbox={"wall_s": 2.0, "cpu_s": 2, "nproc": 16, "output_bytes": 1 << 16}
    )
    res = CodeReward(opts).score(task, [_fence(a) for a in attacks])
    assert [r.outcome for r in res] == [
        "timeout",
        "runtime_error",
        "runtime_error",
        "runtime_error",
        "runtime_error",
    ]
    assert not any(r.excluded for r in res) and all(r.score == 0.0 for r in res)
