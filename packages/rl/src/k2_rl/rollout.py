"""Rollouts with partial rollout: K samples per prompt, paused at a segment limit and resumed.

Each iteration every unfinished trajectory (paused earlier, or new) is extended by at most
`segment_tokens` tokens from the current policy. A trajectory that stops on its own, or reaches
its task's token budget, is finished; one still running at the segment limit is paused and kept
for the next iteration, which resumes it from the prompt plus everything it has produced so far.
Every response token carries the log-probability under, and the version of, the policy that
sampled it. A sample the engine gave up on (finish_reason "failed", after its retries) leaves
its group and is counted; the rest of the group trains as usual. A group (the K samples of one
prompt) goes to training once all K are finished, so its baseline is complete. Paused groups
whose oldest token is staler than the version gate allows are dropped (counted as refused).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .budget import apply_budget
from .weight_sync import VersionGate


@dataclass
class Trajectory:
    """One sampled response, possibly built over several iterations."""

    group: int  # the prompt's group id (K trajectories share it)
    task: str
    prompt: dict[str, Any]
    prompt_ids: list[int]
    member: int = 0  # its index among the K samples
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log pi_old per token
    versions: list[int] = field(default_factory=list)  # policy version per token
    finished: bool = False
    finish_reason: str = ""  # "stop" | "budget" | ""
    segments: int = 0
    budget: int | None = None

    @property
    def over_budget(self) -> bool:
        """Finished by running into its token budget (truncated)."""
        return self.finish_reason == "budget"

    @property
    def oldest_version(self) -> int:
        """The policy version of its first token (-1 when it has none)."""
        return self.versions[0] if self.versions else -1


@dataclass
class RolloutStats:
    """What one rollout iteration did."""

    new_groups: int = 0
    resumed: int = 0
    paused: int = 0
    refused_groups: int = 0
    failed_samples: int = 0  # samples the engine gave up on (excluded from their groups)
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Rollout throughput (generated tokens per second)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _seed(base: int | None, t: Trajectory) -> int | None:
    if base is None:
        return None
    key = f"{base}/{t.group}/{t.member}/{t.segments}".encode()
    return zlib.crc32(key) | (zlib.adler32(key) << 32)


class RolloutManager:
    """Keeps the groups in flight and runs one rollout iteration at a time.

    `engine` has `generate(prompts, params) -> [Completion]` and `version`; `make_params` builds
    the engine's SamplingParams from (temperature, max_new_tokens, seed).
    """

    def __init__(
        self,
        engine: Any,
        make_params: Callable[..., Any],
        *,
        k: int,
        segment_tokens: int | None,
        gate: VersionGate,
        partial: bool = True,
    ):
        self.engine, self.make_params, self.k = engine, make_params, k
        self.segment_tokens, self.gate, self.partial = segment_tokens, gate, partial
        self.in_flight: list[Trajectory] = []
        self.next_group = 0

    def groups_in_flight(self) -> int:
        """Groups started and not yet handed to training."""
        return len({t.group for t in self.in_flight})

    def _refuse_stale(self, version: int, stats: RolloutStats) -> None:
        stale = {
            t.group
            for t in self.in_flight
            if t.versions and not self.gate.accepts(t.oldest_version, version)
        }
        if stale:
            stats.refused_groups += len(stale)
            self.in_flight = [t for t in self.in_flight if t.group not in stale]

    def add_prompts(
        self,
        prompts: Iterator[tuple[dict[str, Any], list[int], str, int | None]],
        n_groups: int,
        stats: RolloutStats,
    ) -> None:
        """Start `n_groups` new groups from `prompts` (record, prompt ids, task, budget)."""
        for _ in range(n_groups):
            record, ids, task, budget = next(prompts)
            g = self.next_group
            self.next_group += 1
            self.in_flight += [
                Trajectory(g, task, record, list(ids), member=i, budget=budget)
                for i in range(self.k)
            ]
            stats.new_groups += 1

    def _room(self, t: Trajectory) -> int:
        room = self.segment_tokens if (self.partial and self.segment_tokens) else None
        if t.budget is not None:
            left = t.budget - len(t.token_ids)
            room = left if room is None else min(room, left)
        return room if room is not None else 1 << 30

    def step(
        self, temperature: float, seed: int | None, stats: RolloutStats
    ) -> list[list[Trajectory]]:
        """Extend every unfinished trajectory by one segment; return the groups now complete."""
        t0 = time.perf_counter()
        version = int(self.engine.version)
        self._refuse_stale(version, stats)
        todo = [t for t in self.in_flight if not t.finished]
        stats.resumed += sum(1 for t in todo if t.token_ids)
        by_room: dict[int, list[Trajectory]] = {}
        for t in todo:
            by_room.setdefault(self._room(t), []).append(t)
        failed: set[int] = set()
        for room, ts in sorted(by_room.items()):
            # one seed per sample and segment: the K samples of a prompt must differ
            params = [
                self.make_params(temperature=temperature, max_new_tokens=room, seed=_seed(seed, t))
                for t in ts
            ]
            outs = self.engine.generate([t.prompt_ids + t.token_ids for t in ts], params)
            for t, c in zip(ts, outs, strict=True):
                if c.finish_reason == "failed":  # failed after its retries: leaves its group
                    failed.add(id(t))
                    continue
                self._extend(t, c, version)
                stats.generated_tokens += len(c.token_ids)
        if failed:
            stats.failed_samples += len(failed)
            self.in_flight = [t for t in self.in_flight if id(t) not in failed]
            todo = [t for t in todo if id(t) not in failed]
        stats.paused += sum(1 for t in todo if not t.finished)
        done_groups: dict[int, list[Trajectory]] = {}
        for t in self.in_flight:
            done_groups.setdefault(t.group, []).append(t)
        complete = [ts for ts in done_groups.values() if all(t.finished for t in ts)]
        finished_ids = {ts[0].group for ts in complete}
        self.in_flight = [t for t in self.in_flight if t.group not in finished_ids]
        stats.seconds += time.perf_counter() - t0
        return complete

    def _extend(self, t: Trajectory, c: Any, version: int) -> None:
        # the version the completion was requested under, when the engine tags it
        tagged = getattr(c, "version", -1)
        version = tagged if tagged is not None and tagged >= 0 else version
        t.token_ids += list(c.token_ids)
        t.logprobs += [float(x) for x in c.logprobs]
        t.versions += [version] * len(c.token_ids)
        t.segments += 1
        if c.finish_reason == "stop":
            t.finished, t.finish_reason = True, "stop"
            return
        decision = apply_budget(len(t.token_ids), False, t.budget)
        if decision.over_budget:
            t.finished, t.finish_reason = True, "budget"
        elif not self.partial:
            # without partial rollout a response cut at the segment limit is just truncated
            t.finished, t.finish_reason = True, "budget"

    def state_dict(self) -> dict[str, Any]:
        """JSON state: the paused trajectories and the group counter (for resume)."""
        return {"next_group": self.next_group, "in_flight": [asdict(t) for t in self.in_flight]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.next_group = int(state["next_group"])
        self.in_flight = [Trajectory(**t) for t in state["in_flight"]]
