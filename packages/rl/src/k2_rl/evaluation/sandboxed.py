"""Running completed exercises through the `code` reward (model-written code in the sandbox)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any


def code_reward(timeout_s: float = 5.0, workers: int = 2) -> Any:
    """The registered `code` reward, each program limited to `timeout_s` seconds."""
    from k2_core.plugins import get_registry

    return get_registry().build(
        "reward",
        "code",
        options={"workers": workers, "sandbox": {"wall_s": timeout_s}},
        where="code",
    )


def run_programs(
    exercises: list[Any], bodies: list[str], *, timeout_s: float = 5.0, workers: int = 2
) -> list[bool]:
    """For each exercise, whether its header plus `body` passes all of its tests in the
    sandbox (a sandbox failure counts as not passed, and is reported once)."""
    reward = code_reward(timeout_s, workers)

    def one(i: int) -> Any:
        e = exercises[i]
        record = {"prompt": e.prompt, "tests": list(e.tests), "entry_point": e.name}
        return reward.score(record, [e.prompt + bodies[i]])[0]

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(len(exercises))))
    broken = [r for r in results if r.excluded]
    if broken:
        print(
            f"k2 eval: warning: the sandbox failed on {len(broken)} program(s) "
            f"({broken[0].detail}); they count as not passed"
        )
    return [r.outcome == "pass" for r in results]
