"""Process group start-up (torchrun env, fail-fast timeout) and the (pp, dp, ep) device mesh."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from k2_core.errors import ConfigError

from .options import H800Options


@dataclass
class Layout:
    """This rank's place in the (pp, dp, ep) grid and the process groups it talks over."""

    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    mesh: Any  # torch DeviceMesh with dims ("pp", "dp", "ep")
    pp_group: Any
    dp_group: Any
    ep_group: Any
    data_group: Any  # dp x ep: ranks that see different data for the same stage

    @property
    def data_size(self) -> int:
        """How many ranks split each global batch (dp * ep)."""
        return self.dp * self.ep

    @property
    def data_rank(self) -> int:
        """This rank's index among the data ranks of its stage."""
        return self.dp_rank * self.ep + self.ep_rank


def resolve_device(options: H800Options) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when asked for (or auto with CUDA), else cpu."""
    want = options.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.options.device=cuda but no CUDA device is visible; use cpu")
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device(want)  # cpu, or meta for a dry run


def init_process_group(options: H800Options, device: torch.device) -> None:
    """Join the job from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT) unless already in
    one."""
    if dist.is_initialized():
        return
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ConfigError(
            f"parallel.backend=h800 needs a launcher: {', '.join(missing)} unset "
            "(run under `torchrun --nproc-per-node N -m k2_core.cli pretrain ...`)"
        )
    backend = options.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=options.timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def build_layout(options: H800Options, device: torch.device) -> Layout:
    """Check pp * dp * ep == world size and build the mesh and its groups (collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    pp, ep = options.pp, options.ep
    if world % (pp * ep):
        raise ConfigError(
            f"parallel.options: world size {world} is not a multiple of pp*ep = {pp * ep}"
        )
    dp = world // (pp * ep) if options.dp == "auto" else options.dp
    if pp * dp * ep != world:
        raise ConfigError(
            f"parallel.options: pp*dp*ep = {pp}*{dp}*{ep} = {pp * dp * ep} but the job has "
            f"{world} ranks; set dp=auto or fix the degrees"
        )
    # a dry run's meta tensors talk over the fake process group's cpu side
    mesh_device = "cpu" if device.type == "meta" else device.type
    mesh = init_device_mesh(mesh_device, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
    data_mesh = mesh["dp", "ep"]._flatten("data")
    return Layout(
        pp=pp,
        dp=dp,
        ep=ep,
        pp_rank=mesh["pp"].get_local_rank(),
        dp_rank=mesh["dp"].get_local_rank(),
        ep_rank=mesh["ep"].get_local_rank(),
        mesh=mesh,
        pp_group=mesh["pp"].get_group(),
        dp_group=mesh["dp"].get_group(),
        ep_group=mesh["ep"].get_group(),
        data_group=data_mesh.get_group(),
    )
