"""Training-state checkpoints: model, optimizer, schedule, RNG, loader, step, tracking run id.

Each checkpoint is `<root>/step_<N>`, written first as `step_<N>.tmp` (tensors, then the
commit marker) and renamed when complete, so a process killed mid-save leaves the previous
checkpoint as the newest loadable one. The last `keep` checkpoints are kept.

`save_train_state` writes from one process (world size 1) in the same rank-parallel format a
distributed backend writes with `k2_core.checkpoint.ShardWriter`: every rank writes its shards
to `step_uris(root, step)[0]`, then after a barrier one rank calls
`commit_train_state(root, step, world_size, train_state_attrs(...))`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import fsspec
import torch

from .checkpoint import COMMIT, ShardWriter, commit_sharded, is_committed, load_tensors
from .errors import CheckpointError

_STEP_RE = re.compile(r"step_(\d+)(\.tmp)?$")
log = logging.getLogger(__name__)


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else None))


def split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors keyed 'pid.name', JSON metadata for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"scalars": scalars, "param_groups": _json_safe(sd["param_groups"])}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`."""
    state: dict[Any, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first, as (step, uri); others are warned about."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    found = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _STEP_RE.match(name)
        if m:
            uri = proto + entry if proto and not entry.startswith(proto) else entry
            if m.group(2):  # a save that never reached its commit (or is under way right now)
                log.warning("k2: skipping checkpoint %s: an unfinished save (never committed)", uri)
            elif is_committed(uri):
                found.append((int(m.group(1)), uri))
            else:
                log.warning("k2: skipping checkpoint %s: no commit marker (%s), incomplete", uri,
                            COMMIT)
    return sorted(found)


def step_uris(root: str, step: int) -> tuple[str, str]:
    """(where the ranks write step `step`, where it lives once committed) under `root`."""
    final = f"{root.rstrip('/')}/step_{step:08d}"
    return f"{final}.tmp", final


def train_state_attrs(step: int, optimizer_meta: dict[str, Any], scheduler: Any = None,
                      loader: Any = None, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON attrs of a training-state checkpoint (what `load_train_state` reads back)."""
    return {
        "step": step,
        "optimizer": optimizer_meta,
        "scheduler": _json_safe(scheduler.state_dict()) if scheduler is not None else None,
        "loader": loader.state_dict() if loader is not None else None,
        **(attrs or {}),
    }


def commit_train_state(root: str, step: int, world_size: int, attrs: dict[str, Any],
                       keep: int = 2) -> str:
    """After every rank closed its ShardWriter on step_uris(...)[0]: commit, prune; -> URI."""
    tmp_uri, final_uri = step_uris(root, step)
    commit_sharded(tmp_uri, final_uri, world_size, attrs)
    fs = fsspec.core.url_to_fs(root)[0]
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        fs.rm(fsspec.core.url_to_fs(old)[1], recursive=True)
    return final_uri


def save_train_state(root: str, step: int, *, model: torch.nn.Module, optimizer: Any,
                     scheduler: Any = None, loader: Any = None, keep: int = 2,
                     attrs: dict[str, Any] | None = None, model_state: dict[str, Any] | None = None,
                     optimizer_state: dict[str, Any] | None = None) -> str:
    """Write the whole training state for `step` under `root`; returns the checkpoint URI.

    `model_state` / `optimizer_state` replace `model.state_dict()` / `optimizer.state_dict()`
    (a distributed backend passes the consolidated, single-process-layout states).
    """
    tmp_uri, _ = step_uris(root, step)
    fs, tmp_path = fsspec.core.url_to_fs(tmp_uri)
    if fs.exists(tmp_path):  # what a killed earlier attempt at this step left
        fs.rm(tmp_path, recursive=True)
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    if model_state is None:
        model_state = model.state_dict()
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with ShardWriter(tmp_uri, 0) as w:
        for group, ts in (("model", model_state), ("optim", opt_tensors), ("rng", rng)):
            for name, t in ts.items():
                w.write(group, name, t.shape, t.dtype, 0, t)
    return commit_train_state(root, step, 1, train_state_attrs(step, opt_meta, scheduler, loader,
                                                               attrs), keep)


def load_train_state(uri: str, *, model: torch.nn.Module, optimizer: Any = None,
                     scheduler: Any = None, loader: Any = None,
                     reshard: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
                     ) -> dict[str, Any]:
    """Restore everything `save_train_state` wrote into the given objects; returns the attrs.

    `reshard(groups, attrs) -> groups`, when given, maps the stored single-process layout
    onto this process's shard (a distributed backend) before anything is loaded.
    """
    groups, attrs = load_tensors(uri)
    if reshard is not None:
        groups = reshard(groups, attrs)
    try:
        model.load_state_dict(groups["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: weights do not match the model ({str(e).splitlines()[1].strip()})") from None
    if optimizer is not None:
        optimizer.load_state_dict(join_optimizer_state(groups.get("optim", {}), attrs["optimizer"]))
    if scheduler is not None and attrs.get("scheduler") is not None:
        scheduler.load_state_dict(attrs["scheduler"])
    if loader is not None and attrs.get("loader") is not None:
        loader.load_state_dict(attrs["loader"])
    rng = groups.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return attrs
