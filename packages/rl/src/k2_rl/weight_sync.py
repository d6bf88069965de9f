"""Weight sync from the trainer to the rollout engine, with a policy version on every push.

Two paths:
- in-process (colocated trainer and engine): `InProcessSync.push` hands the trainer's tensors
  to `engine.load_weights(state, version)`;
- torch.distributed (trainer and engine in different processes): the trainer rank broadcasts
  the version, then the weights in flat buckets of at most `bucket_mb` MiB, each bucket one
  dtype; every engine rank receives into its own buffers and loads them. Both sides derive the
  same bucket plan from the model's state_dict (same names, shapes, dtypes, order), so nothing
  but the version and the bucket payloads crosses the wire.

`VersionGate` refuses rollouts sampled by a policy more than `max_lag` versions older than the
trainer's current one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from k2_core.errors import K2Error


class StaleRolloutError(K2Error):
    """A rollout sampled by a policy version older than the configured lag allows."""

    kind = "rl"


@dataclass(frozen=True)
class VersionGate:
    """Accepts a rollout of policy version v at trainer version c when c - v <= max_lag."""

    max_lag: int

    def accepts(self, rollout_version: int, current_version: int) -> bool:
        """True when the rollout is fresh enough to train on."""
        return current_version - rollout_version <= self.max_lag

    def check(self, rollout_version: int, current_version: int) -> None:
        """Raise StaleRolloutError when the rollout is too stale."""
        if not self.accepts(rollout_version, current_version):
            raise StaleRolloutError(
                f"rollout from policy version {rollout_version} is "
                f"{current_version - rollout_version} versions behind the trainer "
                f"({current_version}); rl.max_version_lag is {self.max_lag}"
            )


def sync_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an engine needs: parameters and persistent buffers, detached."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Total bytes of the tensors in `state`."""
    return sum(t.numel() * t.element_size() for t in state.values())


class InProcessSync:
    """Colocated engine: the trainer's weights are loaded into the engine directly."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.last_seconds = 0.0
        self.last_bytes = 0

    def push(self, model: torch.nn.Module, version: int) -> None:
        """Load `model`'s current weights into the engine as policy `version`."""
        t0 = time.perf_counter()
        state = sync_state(model)
        self.engine.load_weights(state, version)
        self.last_seconds, self.last_bytes = time.perf_counter() - t0, state_bytes(state)


def bucket_plan(state: dict[str, torch.Tensor], bucket_mb: float) -> list[list[str]]:
    """Names grouped into buckets: consecutive same-dtype tensors up to `bucket_mb` MiB each."""
    limit = max(1, int(bucket_mb * 2**20))
    plan: list[list[str]] = []
    size, dtype = 0, None
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if not plan or t.dtype != dtype or (size + nbytes > limit and plan[-1]):
            plan.append([])
            size, dtype = 0, t.dtype
        plan[-1].append(name)
        size += nbytes
    return plan


class DistributedSync:
    """Bucketed broadcast of weights from `src` to every other rank of `group`.

    The trainer rank calls `send(model, version)`; each engine rank calls `receive(engine)`
    (or `receive_state(template)` to get the tensors) with the same `bucket_mb`.
    """

    def __init__(self, src: int = 0, group: Any = None, bucket_mb: float = 32.0):
        self.src, self.group, self.bucket_mb = src, group, bucket_mb
        self.last_seconds = 0.0
        self.last_bytes = 0
        self.buckets = 0

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(t, src=self.src, group=self.group)

    def send(self, model: torch.nn.Module, version: int) -> None:
        """Broadcast policy `version` and then `model`'s weights, bucket by bucket."""
        t0 = time.perf_counter()
        state = sync_state(model)
        self._broadcast(torch.tensor([version], dtype=torch.int64))
        plan = bucket_plan(state, self.bucket_mb)
        for names in plan:
            flat = torch.cat([state[n].reshape(-1) for n in names])
            self._broadcast(flat)
        self.last_seconds, self.last_bytes = time.perf_counter() - t0, state_bytes(state)
        self.buckets = len(plan)

    def receive_state(
        self, template: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Receive (weights shaped like `template`, their version) from the trainer rank."""
        t0 = time.perf_counter()
        head = torch.zeros(1, dtype=torch.int64)
        self._broadcast(head)
        out: dict[str, torch.Tensor] = {}
        plan = bucket_plan(template, self.bucket_mb)
        for names in plan:
            numels = [template[n].numel() for n in names]
            flat = torch.empty(sum(numels), dtype=template[names[0]].dtype)
            self._broadcast(flat)
            for n, part in zip(names, flat.split(numels), strict=True):
                out[n] = part.view(template[n].shape)
        self.last_seconds, self.last_bytes = time.perf_counter() - t0, state_bytes(out)
        self.buckets = len(plan)
        return out, int(head.item())

    def receive(self, engine: Any, template: dict[str, torch.Tensor]) -> int:
        """Receive the weights into `engine` (load_weights); returns their version."""
        state, version = self.receive_state(template)
        engine.load_weights(state, version)
        return version
