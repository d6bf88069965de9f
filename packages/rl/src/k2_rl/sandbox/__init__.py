"""A sandbox for model-written Python: `run_python(code, stdin, limits=...) -> SandboxResult`."""

from .limits import SandboxLimits
from .result import OUTCOMES, SandboxResult
from .runner import capabilities, protections, run_python

__all__ = [
    "OUTCOMES",
    "SandboxLimits",
    "SandboxResult",
    "capabilities",
    "protections",
    "run_python",
]
