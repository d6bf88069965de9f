"""ZeRO-1 MuonClip over torch.distributed: optimizer state split by dim-0 rows, balanced.

Every rank holds its stage's parameters (dense ones replicated over `process_group`, expert
shards over `expert_group`) but optimizer state only for the rows it owns. The ownership is
`zero_plan.plan_zero1` over the parameters' shapes: a 2-D Muon matrix is owned whole (Muon
orthogonalises whole matrices), a 3-D Muon stack is cut between whole experts, an AdamW tensor
between rows; the cuts balance per-rank state bytes over the whole stage (max/mean <= 1.1 on
K2-sized stages, where whole-tensor ownership cannot get there).

step():
1. gradients are averaged (dense over `process_group`, experts summed over `expert_group`,
   both divided by the size of `process_group`, as the h800 backend does) unless
   `reduce_grads=False` (the caller already did it);
2. each rank updates its owned rows (Muon in bounded buckets, AdamW foreach);
3. the updated rows are all-gathered in rounds of at most `bucket_bytes` of receive buffer
   (one flat all-gather per round, per group and dtype: no per-parameter collective);
4. QK-Clip runs on every replica with max logits all-reduced (MAX) over `process_group`, so
   the replicas stay identical.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .muon import Muon, _dim0, grad_of
from .qkclip import MuonClip
from .zero_plan import StateSpec, Zero1Plan, plan_zero1

#: the attribute k2-hw-h800 sets on expert parameters holding only this rank's E/ep experts
EXPERT_ATTR = "_k2_ep_sharded"

Rows = tuple[int, int]


def assign_owners(numels: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: greedy longest-processing-time, deterministic on every rank."""
    load = [0] * world_size
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += numels[i]
    return owners


def state_spec(p: Tensor, use_muon: bool, align: int = 1, master: bool = False) -> StateSpec:
    """How `p`'s optimizer state looks to the planner: Muon one momentum, AdamW two moments,
    both shaped like p (FP32 plus an FP32 master copy when `master`); 2-D (and >= 4-D) Muon
    matrices whole, everything else by rows."""
    rows = _dim0(p)
    per_row = p.numel() // rows if rows else 0
    splittable = p.ndim == 3 if use_muon else p.ndim >= 1
    tensors = (1 if use_muon else 2) + (1 if master else 0)
    width = 4 if master else p.element_size()
    return StateSpec(rows, per_row * width * tensors, splittable, max(1, int(align)))


def _is_expert(p: Tensor) -> bool:
    return bool(getattr(p, EXPERT_ATTR, False))


def _rows_key(rows: Any, pid: Any) -> Rows | None:
    """`rows[pid]` as a tuple, whether the keys survived as ints or became strings (JSON)."""
    got = rows.get(pid, rows.get(str(pid)))
    return None if got is None else (int(got[0]), int(got[1]))


def _merge_pieces(
    pieces: dict[int, list[tuple[Rows, dict[str, Any]]]], shapes: dict[int, int]
) -> dict[int, dict[str, Any]]:
    """Per parameter index, the row pieces' states concatenated along dim 0 in row order."""
    out: dict[int, dict[str, Any]] = {}
    for pid, parts in pieces.items():
        parts = sorted(parts, key=lambda x: x[0][0])
        stop = 0
        for (a, b), _ in parts:
            if a != stop:
                raise ValueError(
                    f"merge: parameter {pid} has rows {stop}..{a} missing or twice "
                    "(shards of different expert slices?)"
                )
            stop = b
        if pid in shapes and stop != shapes[pid]:
            raise ValueError(f"merge: parameter {pid} has {stop} of its {shapes[pid]} rows")
        st: dict[str, Any] = {}
        for key, v in parts[0][1].items():
            if torch.is_tensor(v) and v.ndim >= 1 and len(parts) > 1:
                st[key] = torch.cat([s[key] for _, s in parts])
            else:
                st[key] = v
        out[pid] = st
    return out


def merge_state_dicts(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank `DistributedMuonClip.state_dict()`s (of one group: the shards of one
    expert slice) into one full state dict, loadable by a single-process MuonClip or by a
    DistributedMuonClip of any layout. Shards without `owned_rows` must hold whole tensors."""
    pieces: dict[int, list[tuple[Rows, dict[str, Any]]]] = defaultdict(list)
    for sd in shards:
        rows = sd.get("owned_rows")
        for pid, st in sd["state"].items():
            got = _rows_key(rows, pid) if rows is not None else None
            if got is None:  # a whole-tensor shard: any tensor's dim 0 is the row count
                t = next((v for v in st.values() if torch.is_tensor(v) and v.ndim), None)
                got = (0, t.shape[0] if t is not None else 1)
            pieces[int(pid)].append((got, st))
    return {"state": _merge_pieces(pieces, {}), "param_groups": shards[0]["param_groups"]}


class DistributedMuonClip(MuonClip):
    """MuonClip with optimizer state sharded by dim-0 rows over one stage's ranks.

    Same arguments as MuonClip plus:
    - process_group: the ranks holding the same dense parameters (k2: the stage's EP x DP
      "data" ranks; default the world);
    - expert_group: the ranks holding the same expert shard (k2: the DP group), a subgroup of
      process_group; parameters with `is_expert(p)` (default: the `_k2_ep_sharded` attribute)
      are sharded over it. None: every parameter is dense;
    - is_expert: predicate for expert-sharded parameters;
    - row_align(p) -> int: split points of p's rows are multiples of it (a checkpoint chunk
      grid); default 1;
    - stage_params: the parameters this rank trains (its pipeline stage); the others get no
      state and are never updated. Default: every parameter;
    - reduce_grads: True: the optimizer averages gradients first; False: the caller did.
    `max_logit_reduce` defaults to an all-reduce MAX over process_group.

    Checkpoint contract:
    - `owned_rows(p) -> (start, stop) | None`: this rank's dim-0 rows of p's state, in p's
      local coordinates (an expert shard's local experts); state tensors shaped like p hold
      exactly those rows (`momentum_buffer`, `exp_avg`, `exp_avg_sq`; `step` is per param);
    - `state_dict()`: this rank's owned state, `param_groups`, `owned_rows` ({param index:
      (start, stop)} for every parameter this rank owns rows of) and `world_size`;
    - `load_state_dict(sd)`: either such a shard of the same layout (its `owned_rows` must
      match this rank's) or a full single-process state dict, sliced to the owned rows;
    - `consolidated_state_dict()` (collective over both groups): the full single-process
      layout on every rank; an expert parameter's state is its local EP slice, whole;
    - `merge_state_dicts(shards)`: the full dict from the shards of one group.
    """

    def __init__(
        self,
        params: Any,
        *args: Any,
        process_group: Any = None,
        expert_group: Any = None,
        is_expert: Callable[[Tensor], bool] | None = None,
        row_align: Callable[[Tensor], int] | None = None,
        stage_params: Iterable[Tensor] | None = None,
        reduce_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedMuonClip needs an initialised torch.distributed group")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.expert_group = expert_group
        self.expert_world_size = 1 if expert_group is None else dist.get_world_size(expert_group)
        self.expert_rank = 0 if expert_group is None else dist.get_rank(expert_group)
        self.reduce_grads = reduce_grads
        if kwargs.get("max_logit_reduce") is None:
            kwargs["max_logit_reduce"] = self._all_reduce_max
        super().__init__(params, *args, **kwargs)
        flat = self._all_params()
        self._index = {id(p): i for i, p in enumerate(flat)}
        expert_of = is_expert or _is_expert
        self._expert_ids = set() if expert_group is None else {id(p) for p in flat if expert_of(p)}
        self.plan = self._make_plan(row_align, stage_params)

    # --- planning -------------------------------------------------------------------------
    def _make_plan(
        self, row_align: Callable[[Tensor], int] | None, stage_params: Iterable[Tensor] | None
    ) -> Zero1Plan:
        """Plan the stage (one all-gather of the expert groups' shapes when there are any)."""
        flat = self._all_params()
        muon = {id(p): g["use_muon"] for g in self.param_groups for p in g["params"]}
        keep = None if stage_params is None else {id(p) for p in stage_params}
        planned = [i for i, p in enumerate(flat) if keep is None or id(p) in keep]
        dense = [i for i in planned if id(flat[i]) not in self._expert_ids]
        expert = [i for i in planned if id(flat[i]) in self._expert_ids]

        def spec(i: int) -> StateSpec:
            p = flat[i]
            return state_spec(p, muon[id(p)], row_align(p) if row_align else 1, self.has_master(p))

        members: list[list[int]] = []
        expert_specs: list[list[StateSpec]] = []
        mine = 0
        if self.expert_group is not None:
            own = (
                tuple(dist.get_process_group_ranks(self.expert_group)),
                [tuple(vars(spec(i)).values()) for i in expert],
            )
            every: list[Any] = [None] * self.world_size
            dist.all_gather_object(every, own, group=self.process_group)
            groups = dict(every)  # the members of every expert group -> its specs
            pg = self.process_group or dist.group.WORLD
            if sum(len(k) for k in groups) < self.world_size:
                groups = _translated_groups(own, pg, self.world_size)
            keys = sorted(groups)
            try:
                members = [[dist.get_group_rank(pg, g) for g in key] for key in keys]
            except (ValueError, RuntimeError) as exc:
                raise ValueError(
                    "DistributedMuonClip: expert_group must be a subgroup of process_group"
                ) from exc
            expert_specs = [[StateSpec(*s) for s in groups[k]] for k in keys]
            mine = keys.index(own[0])
        plan = plan_zero1([spec(i) for i in dense], self.world_size, expert_specs, members)
        self._rows: dict[int, Rows] = {}
        # per rank of each group: (param index, start, stop) in parameter order
        self._dense_owners: list[list[tuple[int, int, int]]] = [[] for _ in range(self.world_size)]
        self._expert_owners: list[list[tuple[int, int, int]]] = [
            [] for _ in range(self.expert_world_size)
        ]
        for k, i in enumerate(dense):
            for r, (a, b) in sorted(plan.dense[k].items()):
                self._dense_owners[r].append((i, a, b))
                if r == self.rank:
                    self._rows[id(flat[i])] = (a, b)
        if expert:
            for k, i in enumerate(expert):
                for r, (a, b) in sorted(plan.experts[mine][k].items()):
                    self._expert_owners[r].append((i, a, b))
                    if r == self.expert_rank:
                        self._rows[id(flat[i])] = (a, b)
        for owners in (self._dense_owners, self._expert_owners):
            for lst in owners:
                lst.sort()
        return plan

    def owned_rows(self, p: Tensor) -> tuple[int, int] | None:
        """This rank's dim-0 rows [start, stop) of p's state (local coordinates), or None."""
        return self._rows.get(id(p))

    def _owned(self, p: Tensor) -> bool:
        return id(p) in self._rows

    def state_bytes(self) -> int:
        """Bytes of the optimizer-state tensors this rank holds."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )

    def _all_reduce_max(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return t

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # --- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def _before_update(self) -> None:
        if not self.reduce_grads or self.world_size == 1:
            return
        for expert, group in ((False, self.process_group), (True, self.expert_group)):
            by_dtype: dict[Any, list[Tensor]] = defaultdict(list)
            for p in self._all_params():
                g = grad_of(p)
                if g is not None and (id(p) in self._expert_ids) == expert:
                    by_dtype[(g.dtype, g.device)].append(g)
            for grads in by_dtype.values():
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=group)
                # experts too: their gradient already sums the other EP ranks' tokens, so the
                # mean over the data ranks divides by the whole process group
                flat.div_(self.world_size)
                torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))

    @torch.no_grad()
    def _after_update(self) -> None:
        self._sync(self._dense_owners, self.process_group, self.rank, self.world_size)
        if self.expert_group is not None:
            self._sync(
                self._expert_owners, self.expert_group, self.expert_rank, self.expert_world_size
            )
        self.apply_qk_clip()

    def _sync(self, owners: list[list[tuple[int, int, int]]], group: Any, me: int, n: int) -> None:
        """Every owner's updated rows to every rank of `group`: flat all-gathers in rounds of
        at most `bucket_bytes` of receive buffer, one stream per dtype and device."""
        if n == 1:
            return
        flat = self._all_params()
        streams: dict[Any, list[list[tuple[Tensor, int, int]]]] = {}
        for r, lst in enumerate(owners):
            for i, a, b in lst:
                p = flat[i]
                if grad_of(p) is None or p.numel() == 0:  # not updated (as on its owner)
                    continue
                per = p.numel() // _dim0(p)
                key = (str(p.dtype), str(p.device))
                streams.setdefault(key, [[] for _ in range(n)])[r].append(
                    (p, a * per, (b - a) * per)
                )
        for key in sorted(streams):
            per_rank = streams[key]
            longest = max(sum(c for *_, c in s) for s in per_rank)
            if not longest:
                continue
            ref = per_rank[me][0][0] if per_rank[me] else next(s[0][0] for s in per_rank if s)
            chunk = min(longest, max(1, self.bucket_bytes // (n * ref.element_size())))
            send = torch.empty(chunk, dtype=ref.dtype, device=ref.device)
            recv = torch.empty(n * chunk, dtype=ref.dtype, device=ref.device)
            outs = list(recv.view(n, chunk).unbind(0))
            for k in range(math.ceil(longest / chunk)):
                lo, hi = k * chunk, (k + 1) * chunk
                mine = _segments(per_rank[me], lo, hi)
                if mine:
                    torch._foreach_copy_(
                        [send[o : o + c] for _, _, c, o in mine],
                        [p.detach().view(-1)[s : s + c] for p, s, c, _ in mine],
                    )
                dist.all_gather(outs, send, group=group)
                dst, src = [], []
                for r in range(n):
                    if r == me:
                        continue
                    for p, s, c, o in _segments(per_rank[r], lo, hi):
                        dst.append(p.detach().view(-1)[s : s + c])
                        src.append(outs[r][o : o + c])
                if dst:
                    torch._foreach_copy_(dst, src)

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: owned state, `param_groups`, `owned_rows`, `world_size`."""
        sd = super().state_dict()
        sd["owned_rows"] = {
            i: self._rows[id(p)] for i, p in enumerate(self._all_params()) if id(p) in self._rows
        }
        sd["world_size"] = self.world_size
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shard of the same layout, or a full (single-process / merged) state dict
        whose tensors this rank slices to its owned rows."""
        flat = self._all_params()
        saved_rows = state_dict.get("owned_rows")
        state: dict[Any, dict[str, Any]] = {}
        for pid, st in state_dict["state"].items():
            p = flat[int(pid)]
            mine = self._rows.get(id(p))
            if mine is None:
                continue
            if saved_rows is not None:
                got = _rows_key(saved_rows, pid)
                if got != mine:
                    raise ValueError(
                        f"DistributedMuonClip.load_state_dict: parameter {pid} was saved with "
                        f"rows {got}, this rank owns {mine}; load a consolidated (full) state "
                        "dict to change the layout"
                    )
                state[pid] = st
                continue
            whole = mine == (0, _dim0(p))
            state[pid] = {
                k: (
                    v[mine[0] : mine[1]].clone()
                    if not whole
                    and torch.is_tensor(v)
                    and v.ndim == p.ndim
                    and v.ndim >= 1
                    and v.shape[0] == _dim0(p)
                    else v
                )
                for k, v in st.items()
            }
        super().load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        for p in flat:
            if not self._owned(p):
                self.state.pop(p, None)

    def consolidated_state_dict(self) -> dict[str, Any]:
        """Collective (both groups): the full single-process-layout state dict on every rank;
        an expert parameter's state is its local EP slice, gathered over the expert group."""
        local = super().state_dict()
        flat = self._all_params()
        parts: list[dict[int, Any]] = [{}, {}]
        for pid, st in local["state"].items():
            p = flat[pid]
            cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
            parts[id(p) in self._expert_ids][pid] = (self._rows[id(p)], cpu)
        pieces: dict[int, list[tuple[Rows, dict[str, Any]]]] = defaultdict(list)
        rounds = [(parts[0], self.process_group, self.world_size)]
        if self.expert_group is not None:
            rounds.append((parts[1], self.expert_group, self.expert_world_size))
        for part, group, n in rounds:
            every: list[Any] = [None] * n
            dist.all_gather_object(every, part, group=group)
            for got in every:
                for pid, (rows, st) in got.items():
                    pieces[pid].append((rows, st))
        shapes = {pid: _dim0(flat[pid]) for pid in pieces}
        return {"state": _merge_pieces(pieces, shapes), "param_groups": local["param_groups"]}


def _translated_groups(
    own: tuple[tuple[int, ...], list[Any]], pg: Any, size: int
) -> dict[tuple[int, ...], list[Any]]:
    """Every expert group of `pg`, built from this rank's own: a fake process group (`k2 plan
    --dry-run`) echoes this rank's object from every rank, so the other groups are taken to be
    its translates on the mesh (strided, as the dp group within dp x ep; the same specs)."""
    ranks = dist.get_process_group_ranks(pg)
    pos = [ranks.index(g) for g in own[0]]
    n = len(pos)
    stride = pos[1] - pos[0] if n > 1 else 1
    if n > 1 and (stride * n != size or pos != list(range(pos[0], size, stride))):
        raise ValueError(
            "DistributedMuonClip: cannot infer the expert groups of a fake "
            "process group from a group that is not strided"
        )
    starts = range(stride) if n > 1 else range(size)
    return {tuple(ranks[o + k * stride] for k in range(n)): own[1] for o in starts}


def _segments(
    pieces: list[tuple[Tensor, int, int]], lo: int, hi: int
) -> list[tuple[Tensor, int, int, int]]:
    """The parts of a rank's stream [lo, hi): (param, element offset in it, count, offset in
    the round's buffer)."""
    out, pos = [], 0
    for p, start, count in pieces:
        a, b = max(lo, pos), min(hi, pos + count)
        if a < b:
            out.append((p, start + a - pos, b - a, a - lo))
        pos += count
        if pos >= hi:
            break
    return out


def rehome_arguments(optimizer: Muon) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(param groups, keyword arguments) that rebuild `optimizer` (a Muon or MuonClip) as another
    MuonClip class with the same settings; a MuonClip's max-logit hooks are handed over."""
    d = optimizer.defaults
    kwargs: dict[str, Any] = dict(
        lr=d["lr"],
        weight_decay=d["weight_decay"],
        momentum=d["momentum"],
        nesterov=d["nesterov"],
        ns_steps=d["ns_steps"],
        ns_coefficients=d["ns_coefficients"],
        ns_eps=d["ns_eps"],
        adjust_lr_fn=d["adjust_lr_fn"],
        adamw_betas=d["betas"],
        adamw_eps=d["eps"],
        ns_dtype=optimizer.ns_dtype,
        bucket_bytes=optimizer.bucket_bytes,
        master_weights=optimizer.master_weights,
    )
    if isinstance(optimizer, MuonClip):
        kwargs.update(
            qk_clip=optimizer.qk_clip,
            qk_clip_tau=optimizer.qk_clip_tau,
            qk_clip_targets=optimizer.qk_clip_targets,
            accumulate_max_logits=bool(optimizer._hooks),
        )
        optimizer.remove_hooks()  # the new optimizer installs its own
    else:
        kwargs.update(qk_clip=False, qk_clip_targets=[])
    return [dict(g) for g in optimizer.param_groups], kwargs


def to_zero1(
    optimizer: Muon,
    process_group: Any = None,
    *,
    expert_group: Any = None,
    is_expert: Callable[[Tensor], bool] | None = None,
    row_align: Callable[[Tensor], int] | None = None,
    stage_params: Iterable[Tensor] | None = None,
    reduce_grads: bool = True,
    max_logit_reduce: Any = None,
) -> DistributedMuonClip:
    """`optimizer` (a Muon or MuonClip) as a DistributedMuonClip with the same settings."""
    groups, kwargs = rehome_arguments(optimizer)
    return DistributedMuonClip(
        groups,
        process_group=process_group,
        expert_group=expert_group,
        is_expert=is_expert,
        row_align=row_align,
        stage_params=stage_params,
        reduce_grads=reduce_grads,
        max_logit_reduce=max_logit_reduce,
        **kwargs,
    )
