"""What a sandboxed run may use: time, memory, processes, files, output; how it is isolated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SandboxLimits(BaseModel):
    """Limits and isolation of one sandboxed Python run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wall_s: float = Field(
        5.0, gt=0, description="Wall-clock seconds before the whole run is killed."
    )
    cpu_s: int = Field(4, ge=1, description="CPU seconds per process (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, description="Address space per process in MiB (RLIMIT_AS).")
    nproc: int = Field(
        32, ge=1, description="Processes of the sandbox user (RLIMIT_NPROC; only with its own uid)."
    )
    fsize_mb: int = Field(16, ge=0, description="Largest file the program may write, MiB.")
    nofile: int = Field(64, ge=8, description="Open file descriptors per process (RLIMIT_NOFILE).")
    workdir_mb: int = Field(
        64,
        ge=1,
        description="Size of the tmpfs that holds the work folder, /tmp, /dev/shm and "
        "/run together (namespaces only); filling it ends the run as disk_limit.",
    )
    output_bytes: int = Field(
        1 << 20, ge=1024, description="Bytes kept of stdout and of stderr; more kills the run."
    )
    isolation: Literal["auto", "namespaces", "rlimits"] = Field(
        "auto",
        description="auto: namespaces when available, else rlimits; namespaces: refuse to run "
        "without them; rlimits: rlimits, process group and timeout only.",
    )
    uid_base: int = Field(
        61000, ge=1000, description="First uid of the pool of sandbox users (when run as root)."
    )
    uid_slots: int = Field(
        16, ge=1, le=1024, description="Sandbox users in the pool: concurrent runs at most."
    )
    python: str | None = Field(
        None,
        description="Interpreter of the program; None: the first of this interpreter and "
        "/usr/bin/python3 that the sandbox user can run.",
    )
    hide_paths: tuple[str, ...] = Field(
        ("/root", "/home"),
        description="Kept for compatibility: with namespaces the new root shows nothing of "
        "the host but the interpreter's prefix and the library folders, so these folders "
        "(and everything else) are hidden anyway.",
    )
    workdir_root: str | None = Field(
        None,
        description="Folder that holds the temporary working folders without namespaces "
        "(isolation='rlimits'); None: the system tmp. With namespaces the work folder is a "
        "tmpfs made inside the mount namespace.",
    )
