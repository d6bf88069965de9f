"""Training-state checkpoints, layout-free: model, optimizer, schedule, RNG, loader, step.

Each checkpoint is `<root>/step_<N>` (format version 2 of `k2_core.checkpoint`), written as
`step_<N>.tmp` and renamed once committed, so a process killed mid-save leaves the previous
checkpoint as the newest loadable one. The last `keep` checkpoints are kept.

What a checkpoint holds does not depend on the layout that wrote it:
- `model/<name>`: every tensor of the single-process `state_dict()` (all experts);
- `optim/<param name>.<state key>`: each optimizer state tensor shaped like its parameter
  (all rows), 0-d tensors for per-parameter scalars (AdamW's `step`);
- `rng/torch` (and `rng/cuda`): the writing process's generator state;
- attrs: `step`, the optimizer's param-group hyperparameters by group name, the schedule's
  scalar state, the loader position, and the caller's attrs.

A process holds some rows of some of these tensors (`Held`: its stage's layers, its experts,
the optimizer rows it owns under ZeRO-1). A `Sharding` (given by a distributed backend) says
which of the held rows this process writes, so that each byte is written by exactly one
process, and synchronises the processes around the commit. On load each process reads only
the rows it holds, whatever layout wrote them. Checkpoints of format version 1 (one process,
optimizer state keyed by parameter index) still load in one process.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import torch
from torch import nn

from .checkpoint import CheckpointReader, ShardWriter, commit_sharded, is_committed, load_tensors
from .errors import CheckpointError
from .model.init import global_rows

_STEP_RE = re.compile(r"step_(\d+)(\.tmp)?$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Held:
    """Rows [start, start + len(tensor)) of the stored tensor group/name (global `shape`)."""

    group: str
    name: str
    shape: tuple[int, ...]
    start: int
    tensor: torch.Tensor

    @property
    def rows(self) -> int:
        """How many rows of the stored tensor this holds (1 for a 0-d tensor)."""
        return int(self.tensor.shape[0]) if self.tensor.dim() else 1


class Sharding(Protocol):
    """How the processes of a job split a save (a distributed backend implements it).

    Optionally `holds(tensor) -> bool`: which model tensors this process holds, where being
    on the meta device does not say (a dry run on meta tensors); absent or None: not on meta.
    """

    rank: int
    world_size: int

    def assign(self, held: list[Held]) -> list[Held]:
        """The (chunk-aligned) parts of `held` this process writes; together, each once."""

    def barrier(self) -> None:
        """Wait for every process of the job."""


class OneProcess:
    """The `Sharding` of a single process: it writes everything it holds."""

    rank, world_size = 0, 1

    def assign(self, held: list[Held]) -> list[Held]:
        """Everything."""
        return held

    def barrier(self) -> None:
        """Nothing to wait for."""


# -- what a process holds -------------------------------------------------------------------


def model_tensors(
    model: nn.Module, holds: Callable[[torch.Tensor], bool] | None = None
) -> list[Held]:
    """The model's state-dict tensors this process holds: `holds(t)`, by default those not on
    meta (another stage's stay there; a dry run, all on meta, says which it holds)."""
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta if holds is None else not holds(t):
            continue
        start, shape = global_rows(t)
        out.append(Held("model", name, shape, start, t.detach()))
    return out


def _params(model: nn.Module, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every parameter the optimizer holds, in its group order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter the model does not name")
            out.append((names[id(p)], p))
    return out


def _dim0(p: torch.Tensor) -> int:
    return int(p.shape[0]) if p.dim() else 1


def optimizer_tensors(model: nn.Module, optimizer: Any) -> list[Held]:
    """The optimizer state this process holds, as `optim/<param name>.<key>` rows."""
    owned = getattr(optimizer, "owned_rows", None)
    out = []
    for name, p in _params(model, optimizer):
        st = optimizer.state.get(p)
        rows = owned(p) if owned is not None else (0, _dim0(p))
        if not st or rows is None:
            continue
        start, shape = global_rows(p)
        for key, v in sorted(st.items()):
            if torch.is_tensor(v) and v.dim() == p.dim() >= 1 and v.shape[1:] == p.shape[1:]:
                out.append(Held("optim", f"{name}.{key}", shape, start + rows[0], v.detach()))
            elif rows[0] == 0 and isinstance(v, (int, float, torch.Tensor)):
                t = torch.as_tensor(v).detach().reshape(())  # a per-parameter scalar: once
                out.append(Held("optim", f"{name}.{key}", (), 0, t))
    return out


# -- saving ---------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else None))


def _group_settings(optimizer: Any) -> dict[str, Any]:
    """Param-group hyperparameters by group name (`group<i>` when unnamed), no parameters."""
    return {
        str(g.get("name", f"group{i}")): _json_safe({k: v for k, v in g.items() if k != "params"})
        for i, g in enumerate(optimizer.param_groups)
    }


def _schedule_state(scheduler: Any) -> dict[str, Any] | None:
    """The schedule's scalar state (per-group lists are rebuilt from the groups on load)."""
    if scheduler is None:
        return None
    return _json_safe(
        {k: v for k, v in scheduler.state_dict().items() if not isinstance(v, (list, tuple, dict))}
    )


def _rng_tensors() -> list[Held]:
    out = [Held("rng", "torch", tuple(s.shape), 0, s) for s in [torch.get_rng_state()]]
    if torch.cuda.is_available():
        s = torch.cuda.get_rng_state()
        out.append(Held("rng", "cuda", tuple(s.shape), 0, s))
    return out


def rank_share(model: nn.Module, optimizer: Any, sharding: Sharding | None = None) -> list[Held]:
    """The rows this process writes of a checkpoint (the RNG state of rank 0 aside): model
    tensors and optimizer state it holds, as `sharding` assigns them (collective)."""
    sh = sharding or OneProcess()
    held = model_tensors(model, getattr(sh, "holds", None))
    return sh.assign([*held, *optimizer_tensors(model, optimizer)])


def save_train_state(
    root: str,
    step: int,
    *,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any = None,
    loader: Any = None,
    keep: int = 2,
    attrs: dict[str, Any] | None = None,
    sharding: Sharding | None = None,
) -> str:
    """Write the training state for `step` under `root` (collective under a `sharding`: each
    process writes its share); returns the checkpoint URI."""
    sh = sharding or OneProcess()
    tmp_uri, final_uri = step_uris(root, step)
    fs, tmp_path = fsspec.core.url_to_fs(tmp_uri)
    if sh.rank == 0 and fs.exists(tmp_path):  # what a killed earlier attempt at this step left
        fs.rm(tmp_path, recursive=True)
    sh.barrier()
    pieces = rank_share(model, optimizer, sh)
    if sh.rank == 0:
        pieces += _rng_tensors()
    with ShardWriter(tmp_uri, sh.rank) as w:
        for h in pieces:
            w.write(h.group, h.name, h.shape, h.tensor.dtype, h.start, h.tensor)
    sh.barrier()
    if sh.rank == 0:
        meta = {
            "step": step,
            "layout_free": True,
            "optimizer": {"groups": _group_settings(optimizer)},
            "scheduler": _schedule_state(scheduler),
            "loader": loader.state_dict() if loader is not None else None,
            **(attrs or {}),
        }
        commit_train_state(root, step, sh.world_size, meta, keep)
    sh.barrier()
    return final_uri


def commit_train_state(
    root: str, step: int, world_size: int, attrs: dict[str, Any], keep: int = 2
) -> str:
    """After every process closed its ShardWriter on step_uris(...)[0]: commit, prune; -> URI."""
    tmp_uri, final_uri = step_uris(root, step)
    commit_sharded(tmp_uri, final_uri, world_size, attrs)
    fs = fsspec.core.url_to_fs(root)[0]
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        fs.rm(fsspec.core.url_to_fs(old)[1], recursive=True)
    return final_uri


def step_uris(root: str, step: int) -> tuple[str, str]:
    """(where the processes write step `step`, where it lives once committed) under `root`."""
    final = f"{root.rstrip('/')}/step_{step:08d}"
    return f"{final}.tmp", final


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first, as (step, uri); a step folder without
    its commit marker is skipped with a one-line warning saying which and why."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    found = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _STEP_RE.match(name)
        if not m:
            continue
        uri = proto + entry if proto and not entry.startswith(proto) else entry
        if m.group(2):
            log.warning("k2: ignoring %s: an interrupted save (never committed)", uri)
        elif is_committed(uri):
            found.append((int(m.group(1)), uri))
        else:
            log.warning("k2: ignoring %s: no commit marker (an incomplete checkpoint)", uri)
    return sorted(found)


# -- loading --------------------------------------------------------------------------------


def _read_into(reader: CheckpointReader, held: Iterable[Held]) -> None:
    """Copy each held tensor's rows from the store (one read of just those rows)."""
    for h in held:
        key = f"{h.group}/{h.name}"
        info = reader.tensors.get(key)
        if info is None:
            raise CheckpointError(
                f"{reader.uri}: no tensor {key}; the checkpoint is of another "
                "model (check the run config)"
            )
        if tuple(info.shape) != tuple(h.shape):
            raise CheckpointError(
                f"{reader.uri}: {key} is {list(info.shape)} in the checkpoint, "
                f"{list(h.shape)} in this model"
            )
        rows = reader.read_rows(h.group, h.name, h.start, h.start + h.rows)
        with torch.no_grad():
            h.tensor.copy_(rows.reshape(h.tensor.shape))


def _optimizer_state(reader: CheckpointReader, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """This process's optimizer state dict (its owned rows), read from the store."""
    owned = getattr(optimizer, "owned_rows", None)
    stored: dict[str, list[str]] = {}
    for key in reader.tensors:
        if key.startswith("optim/"):
            pname, skey = key[len("optim/") :].rsplit(".", 1)
            stored.setdefault(pname, []).append(skey)
    state: dict[int, dict[str, Any]] = {}
    rows_of: dict[int, tuple[int, int]] = {}
    for pid, (name, p) in enumerate(_params(model, optimizer)):
        rows = owned(p) if owned is not None else (0, _dim0(p))
        if rows is None or name not in stored:
            continue
        start, _ = global_rows(p)
        st: dict[str, Any] = {}
        for skey in stored[name]:
            info = reader.tensors[f"optim/{name}.{skey}"]
            if not info.shape:  # a scalar
                v = reader.read_rows("optim", f"{name}.{skey}")
                st[skey] = v.item() if not v.is_floating_point() else v.to(p.device)
            else:
                v = reader.read_rows("optim", f"{name}.{skey}", start + rows[0], start + rows[1])
                st[skey] = v.to(device=p.device)
        state[pid] = st
        rows_of[pid] = rows
    saved = reader.attrs.get("optimizer", {}).get("groups", {})
    groups, first = [], 0
    for i, g in enumerate(optimizer.param_groups):  # torch's state-dict form, settings restored
        settings = saved.get(str(g.get("name", f"group{i}")), {})
        mine = {k: v for k, v in g.items() if k != "params"}
        mine.update({k: v for k, v in settings.items() if k in mine})
        groups.append({**mine, "params": list(range(first, first + len(g["params"])))})
        first += len(g["params"])
    sd: dict[str, Any] = {"state": state, "param_groups": groups}
    if owned is not None:
        sd["owned_rows"] = rows_of
    return sd


def _load_schedule(scheduler: Any, optimizer: Any, state: dict[str, Any]) -> None:
    merged = {**scheduler.state_dict(), **state}
    scheduler.load_state_dict(merged)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def load_train_state(
    uri: str,
    *,
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    loader: Any = None,
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Restore what `save_train_state` wrote into the given objects, reading only the rows
    this process holds; returns the attrs. `stats`, when given, receives `bytes_read`."""
    reader = CheckpointReader(uri)
    try:
        return _load(reader, model, optimizer, scheduler, loader)
    finally:
        if stats is not None:
            stats["bytes_read"] = reader.bytes_read


def load_weights(uri: str, model: nn.Module) -> None:
    """Only the model weights of a checkpoint (a training checkpoint of any layout, or a saved
    model), and only the rows this process holds (its stage, its experts): how a fine-tuning
    run starts from another run's weights under any backend. Optimizer, schedule, loader and
    RNG state are left alone."""
    reader = CheckpointReader(uri)
    held = model_tensors(model)
    missing = [h.name for h in held if f"model/{h.name}" not in reader.tensors]
    if missing:
        raise CheckpointError(f"{uri}: weights do not match the model (missing {missing[0]})")
    _read_into(reader, held)


def _load(
    reader: CheckpointReader, model: nn.Module, optimizer: Any, scheduler: Any, loader: Any
) -> dict[str, Any]:
    uri = reader.uri
    if not reader.attrs.get("layout_free"):
        return _load_v1(uri, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
    _read_into(reader, model_tensors(model))
    attrs = reader.attrs
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(reader, model, optimizer))
    if scheduler is not None and attrs.get("scheduler") is not None:
        _load_schedule(scheduler, optimizer, attrs["scheduler"])
    if loader is not None and attrs.get("loader") is not None:
        loader.load_state_dict(attrs["loader"])
    if "rng/torch" in reader.tensors:
        torch.set_rng_state(reader.read_rows("rng", "torch"))
    if "rng/cuda" in reader.tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(reader.read_rows("rng", "cuda"))
    return attrs


def _load_v1(
    uri: str, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None, loader: Any = None
) -> dict[str, Any]:
    """A checkpoint written before the layout-free format: one process, indices as keys."""
    groups, attrs = load_tensors(uri)
    try:
        model.load_state_dict(groups["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{uri}: weights do not match the model ({str(e).splitlines()[1].strip()})"
        ) from None
    if optimizer is not None:
        state: dict[Any, dict[str, Any]] = {}
        for key, t in groups.get("optim", {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = t
        for pid, st in attrs["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(st)
        optimizer.load_state_dict(
            {"state": state, "param_groups": attrs["optimizer"]["param_groups"]}
        )
    if scheduler is not None and attrs.get("scheduler") is not None:
        scheduler.load_state_dict(attrs["scheduler"])
    if loader is not None and attrs.get("loader") is not None:
        loader.load_state_dict(attrs["loader"])
    rng = groups.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    return attrs
