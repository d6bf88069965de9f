"""ZeRO-1 ownership plan on shapes alone: which rank owns which dim-0 rows of each parameter's
optimizer state. Pure Python (no torch, no torch.distributed), so a 1T-parameter stage can be
planned and checked from its shapes.

The ranks of a pipeline stage are one "dense" group (every rank holding the replicated
parameters, EP x DP in k2) and disjoint "expert" groups (the DP replicas of one EP slice). Each
parameter's state is cut along dim 0 into contiguous row ranges, at most one per rank:
- items that may not be split (a 2-D Muon matrix is orthogonalised whole) go to the least
  loaded rank, largest first (LPT);
- splittable items (AdamW tensors by rows, 3-D Muon stacks by whole matrices) are laid end to
  end and cut by water-filling: every rank is topped up to one common level, each cut moved to
  the nearest allowed split point (a multiple of the item's `align` rows), so a rank misses
  the level by at most one split granule and cut errors never accumulate.
Order: the dense whole items first, then each expert group's items over its members (a rank
already holding a big dense matrix takes fewer experts), then the dense splittable items over
every rank, which smooths what the coarser steps left.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

#: one rank's rows of one parameter: [start, stop) of dim 0
Rows = tuple[int, int]


@dataclass(frozen=True)
class StateSpec:
    """One parameter as the planner sees it: dim-0 rows and the state bytes of each."""

    rows: int  # dim 0 of the (local) parameter; 1 for a 0-D one
    row_bytes: int  # optimizer-state bytes of one dim-0 row (all state tensors)
    splittable: bool = True  # False: one rank owns every row (a whole Muon matrix)
    align: int = 1  # split points are multiples of this many rows (the end is too)

    @property
    def nbytes(self) -> int:
        """State bytes of the whole parameter."""
        return self.rows * self.row_bytes


@dataclass
class Zero1Plan:
    """The ownership of one stage: row ranges per parameter and bytes per dense-group rank."""

    dense: list[dict[int, Rows]]  # per dense param: dense-group rank -> rows
    experts: list[list[dict[int, Rows]]]  # per expert group, per param: member index -> rows
    loads: list[int]  # per dense-group rank: owned state bytes
    members: list[list[int]] = field(default_factory=list)  # expert group -> dense-group ranks

    @property
    def mean(self) -> float:
        """Optimizer-state bytes per rank if perfectly balanced (the memory planner's figure)."""
        return sum(self.loads) / max(1, len(self.loads))

    def imbalance(self) -> float:
        """max / mean of the per-rank optimizer-state bytes (1.0 when nothing is planned)."""
        return max(self.loads) / self.mean if self.mean else 1.0


def _lpt(
    specs: Sequence[StateSpec], idxs: Sequence[int], ranks: Sequence[int], loads: list[int]
) -> dict[int, tuple[int, Rows]]:
    """Whole items, largest first, each to the least-loaded of `ranks` (ties: lowest rank)."""
    out: dict[int, tuple[int, Rows]] = {}
    for i in sorted(idxs, key=lambda i: (-specs[i].nbytes, i)):
        r = min(ranks, key=lambda r: (loads[r], r))
        out[i] = (r, (0, specs[i].rows))
        loads[r] += specs[i].nbytes
    return out


def _level(loads: Sequence[int], total: int) -> float:
    """Water level L with sum(max(0, L - load)) == total."""
    srt = sorted(loads)
    acc = 0
    for k, base in enumerate(srt):
        # filling the k lowest ranks up to the next one's load would take this much
        nxt = srt[k + 1] if k + 1 < len(srt) else float("inf")
        acc += base
        level = (total + acc) / (k + 1)
        if level <= nxt:
            return level
    return float(srt[-1])  # unreachable: the last step always returns


def _water_fill(
    specs: Sequence[StateSpec], idxs: Sequence[int], ranks: Sequence[int], loads: list[int]
) -> dict[int, list[tuple[int, Rows]]]:
    """Splittable items laid end to end, cut so that every rank of `ranks` reaches one level."""
    items = [i for i in idxs if specs[i].nbytes > 0]
    out: dict[int, list[tuple[int, Rows]]] = {i: [] for i in idxs}
    for i in idxs:
        if specs[i].nbytes == 0:  # an empty tensor: nothing to balance, someone must own it
            out[i].append((ranks[0], (0, specs[i].rows)))
    if not items:
        return out
    starts, off = [], 0
    for i in items:
        starts.append(off)
        off += specs[i].nbytes
    total = off
    level = _level([loads[r] for r in ranks], total)

    def snap(pos: float) -> int:
        """The allowed split point (in stream bytes) nearest to `pos`."""
        if pos <= 0:
            return 0
        if pos >= total:
            return total
        k = bisect.bisect_right(starts, pos) - 1
        s = specs[items[k]]
        step = s.align * s.row_bytes
        t = round((pos - starts[k]) / step)
        return min(starts[k] + t * step, starts[k] + s.nbytes)

    cuts, acc = [0], 0.0
    for r in ranks:
        acc += max(0.0, level - loads[r])
        cuts.append(snap(acc))
    cuts[-1] = total  # float rounding must not leave a tail unowned
    for r, lo, hi in zip(ranks, cuts, cuts[1:], strict=False):
        if hi <= lo:
            continue
        loads[r] += hi - lo
        k = bisect.bisect_right(starts, lo) - 1
        while k < len(items) and starts[k] < hi:
            s = specs[items[k]]
            a = max(lo, starts[k]) - starts[k]
            b = min(hi, starts[k] + s.nbytes) - starts[k]
            if b > a:
                out[items[k]].append((r, (a // s.row_bytes, b // s.row_bytes)))
            k += 1
    return out


def plan_zero1(
    dense: Sequence[StateSpec],
    world: int,
    experts: Sequence[Sequence[StateSpec]] = (),
    members: Sequence[Sequence[int]] = (),
) -> Zero1Plan:
    """Plan one stage: `dense` params over dense-group ranks 0..world-1, `experts[g]` over
    `members[g]` (the dense-group ranks of expert group g, in expert-group rank order).

    Deterministic: every rank computes the same plan from the same specs.
    """
    if len(experts) != len(members):
        raise ValueError("plan_zero1: one member list per expert group")
    loads = [0] * world
    plan_dense: list[dict[int, Rows]] = [{} for _ in dense]
    whole = [i for i, s in enumerate(dense) if not s.splittable or s.rows <= 1]
    for i, (r, rows) in _lpt(dense, whole, range(world), loads).items():
        plan_dense[i][r] = rows
    plan_experts: list[list[dict[int, Rows]]] = []
    for specs, mem in zip(experts, members, strict=True):
        local = {r: m for m, r in enumerate(mem)}  # dense-group rank -> member index
        got: list[dict[int, Rows]] = [{} for _ in specs]
        ew = [i for i, s in enumerate(specs) if not s.splittable or s.rows <= 1]
        for i, (r, rows) in _lpt(specs, ew, list(mem), loads).items():
            got[i][local[r]] = rows
        es = [i for i, s in enumerate(specs) if s.splittable and s.rows > 1]
        for i, parts in _water_fill(specs, es, list(mem), loads).items():
            for r, rows in parts:
                got[i][local[r]] = rows
        plan_experts.append(got)
    split = [i for i, s in enumerate(dense) if s.splittable and s.rows > 1]
    for i, parts in _water_fill(dense, split, range(world), loads).items():
        for r, rows in parts:
            plan_dense[i][r] = rows
    return Zero1Plan(plan_dense, plan_experts, loads, [list(m) for m in members])
