"""Sandbox and `code` reward speed: latency of one run, code-reward throughput by worker count.

uv run python bench/bench_sandbox.py [--reps 20] [--responses 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from k2_rl.rewards.code_reward import CodeReward
from k2_rl.rewards.options import CodeRewardOptions
from k2_rl.sandbox import SandboxLimits, run_python

TASK = {
    "prompt": "Write add(a, b).",
    "entry_point": "add",
    "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"],
}
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
# assert tests that are not input/expected pairs: they run in a sandbox of their own and reach
# the answer through the plain-data call boundary (one answer run, one test run per round)
CODE_TESTS = {
    "prompt": "Write add(a, b).",
    "entry_point": "add",
    "tests": ["assert add(1, 2) + add(0, 0) == 3", "r = add(-1, 1)\nassert r == 0"],
}


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Print the median latency of one sandboxed run per isolation and the reward throughput."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--responses", type=int, default=16)
    args = ap.parse_args()
    run_python("pass")  # warm-up: capability and interpreter probes
    for isolation in ("namespaces", "rlimits"):
        limits = SandboxLimits(isolation=isolation)
        run_python("pass", limits=limits)
        med = _median_s(lambda lim=limits: run_python("print(1)", limits=lim), args.reps)
        print(f"one run, {isolation:10s}: median {med * 1000:.0f} ms")
    for workers in (1, 2, 4):
        reward = CodeReward(CodeRewardOptions(workers=workers))
        med = _median_s(
            lambda r=reward: r.score(TASK, [GOOD] * args.responses), max(3, args.reps // 5)
        )
        print(
            f"code reward, {args.responses} responses, {workers} workers: {med:.2f} s "
            f"({args.responses / med:.1f} responses/s)"
        )
    reward = CodeReward(CodeRewardOptions(workers=2))
    med = _median_s(
        lambda: reward.score(CODE_TESTS, [GOOD] * args.responses), max(3, args.reps // 5)
    )
    print(
        f"code reward, tests through the call boundary, {args.responses} responses, "
        f"2 workers: {med:.2f} s"
    )


if __name__ == "__main__":
    main()
