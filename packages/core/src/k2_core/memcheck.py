"""Refuse, before anything is allocated, a run whose training state cannot fit this machine.

The backend says what the processes started on this host will hold (`Backend.local_state_bytes`:
weights, gradients and optimizer state, per process, as the planner counts them for its
layout). On the CPU their sum is compared with the host's memory (RAM, or the cgroup limit when
lower); on a GPU each process's share with its device's memory. `parallel.memory_check=false`
goes ahead anyway; a dry run (`k2 plan --dry-run`, meta tensors) is never checked.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import ConfigError

GiB = 1024**3


def host_memory_bytes() -> int | None:
    """Physical memory of this host, or the cgroup's limit when lower; None if unknown."""
    found = []
    try:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            found.append(int(text))
    return min(found) if found else None


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory of an accelerator (None for the CPU, the meta device or an unknown one)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def _fmt(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / GiB:.1f} GiB"


def check_memory_fits(cfg: Any, backend: Any) -> None:
    """A one-line ConfigError when this host's processes' training state cannot fit."""
    device = torch.device(getattr(backend, "device", "cpu"))
    if device.type == "meta" or not cfg.parallel.memory_check:
        return
    shares = backend.local_state_bytes(cfg)
    if not shares:
        return
    fix = (
        f"use a smaller model or more ranks (`k2 plan --model {cfg.name or 'MODEL'} --nodes N "
        "--dry-run` shows each rank's share), or set parallel.memory_check=false to go ahead "
        "anyway"
    )
    if device.type == "cpu":
        cap = host_memory_bytes()
        need = sum(shares)
        if cap is not None and need > cap:
            who = (
                "this process"
                if len(shares) == 1
                else f"the {len(shares)} processes of this host (up to {_fmt(max(shares))} each)"
            )
            raise ConfigError(
                f"parallel.memory_check: {who} would hold {_fmt(need)} of weights, gradients "
                f"and optimizer state but this machine has {_fmt(cap)} of memory; {fix}"
            )
        return
    cap = device_memory_bytes(device)
    mine = max(shares)
    if cap is not None and mine > cap:
        raise ConfigError(
            f"parallel.memory_check: each process would hold up to {_fmt(mine)} of weights, "
            f"gradients and optimizer state but {device} has {_fmt(cap)}; {fix}"
        )
