"""What a sandboxed run reports."""

from __future__ import annotations

from dataclasses import dataclass

OUTCOMES = (
    "ok",
    "runtime_error",
    "timeout",
    "memory_limit",
    "output_limit",
    "disk_limit",
    "sandbox_error",
)


@dataclass(frozen=True)
class SandboxResult:
    """A finished run: how it ended, its capped output and which protections were active.

    `outcome` is one of OUTCOMES. `sandbox_error` means the sandbox itself failed (it could not
    isolate or start the program); the program's behaviour is then unknown, never wrong.
    """

    outcome: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    signal: int = 0
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    protections: tuple[str, ...] = ()
    uid: int | None = None
    leftovers_killed: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0 within its limits."""
        return self.outcome == "ok"
