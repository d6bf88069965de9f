"""Who writes what of a layout-free checkpoint under a (pp, dp, ep) layout.

`k2_core.trainstate` asks each rank for the rows it holds (`Held`) and a `Sharding` to pick the
rows it writes. Here every stored byte gets exactly one writer:
- optimizer state under ZeRO-1: its owner (the rows `owned_rows` gives it), as is;
- expert tensors (and their state without ZeRO-1): spread over the dp replicas of the EP slice;
- every other tensor of the stage: spread over the stage's dp x ep data ranks;
each spread balancing the bytes a rank already writes (`k2_core.checkpoint.spread_rows`, cut on
the chunk grid). Pipeline stages hold disjoint tensors, so they never overlap. Only per-rank
byte counts cross the network (one all-gather of an int per group): no tensor moves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from k2_core.checkpoint import chunk_rows, spread_rows
from k2_core.trainstate import Held

from .mesh import Layout


def _nbytes(h: Held, rows: int | None = None) -> int:
    """Bytes of `rows` of h's rows in whole chunks (what a writer of them writes)."""
    n = h.rows if rows is None else rows
    if not h.shape:
        return h.tensor.element_size()
    per_chunk = chunk_rows(h.shape)
    chunks = -(-n // per_chunk)
    return chunks * per_chunk * h.tensor[0].numel() * h.tensor.element_size() if n else 0


def _gather_int(value: int, group: Any, size: int) -> list[int]:
    """Every group member's `value` (a one-int all-gather; the group is small)."""
    if size == 1:
        return [value]
    mine = torch.tensor([value], dtype=torch.long)
    out = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


class LayoutSharding:
    """The `k2_core.trainstate.Sharding` of one rank of the h800 backend."""

    def __init__(self, layout: Layout, expert_names: set[str], zero_owned: bool, holds: Any = None):
        self.layout = layout
        self.expert_names = expert_names
        self.zero_owned = zero_owned
        self.holds = holds  # on the meta device (a dry run): which model tensors are this rank's
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        """Every rank of the job."""
        dist.barrier()

    def _is_expert(self, h: Held) -> bool:
        name = h.name if h.group == "model" else h.name.rsplit(".", 1)[0]
        return name in self.expert_names

    def _spread(self, held: list[Held], me: int, size: int, load: list[int]) -> list[Held]:
        """My parts of `held` (replicated over `size` ranks, I am `me`), balancing `load`."""
        if size == 1:
            return held
        arrays = {
            f"{h.group}/{h.name}": (tuple(h.tensor.shape) if h.shape else (), h.tensor.dtype)
            for h in held
        }
        runs = spread_rows(arrays, size, load)
        out = []
        for h in held:
            for rank, a, b in runs[f"{h.group}/{h.name}"]:
                if rank == me and (b > a or not h.shape):
                    out.append(
                        Held(
                            h.group,
                            h.name,
                            h.shape,
                            h.start + a,
                            h.tensor if not h.shape else h.tensor[a:b],
                        )
                    )
        return out

    def assign(self, held: list[Held]) -> list[Held]:
        """This rank's writes: its ZeRO-1 state, its share of its EP slice's and its stage's
        replicated tensors."""
        lay = self.layout
        owned = [h for h in held if h.group == "optim" and self.zero_owned]
        rest = [h for h in held if not (h.group == "optim" and self.zero_owned)]
        experts = [h for h in rest if self._is_expert(h)]
        dense = [h for h in rest if not self._is_expert(h)]
        mine = list(owned)
        load = sum(_nbytes(h) for h in owned)
        for group, size, members in (
            (lay.dp_group, lay.dp, experts),
            (lay.data_group, lay.data_size, dense),
        ):
            me = dist.get_rank(group) if size > 1 else 0
            part = self._spread(members, me, size, _gather_int(load, group, size))
            mine += part
            load += sum(_nbytes(h) for h in part)
        return mine
