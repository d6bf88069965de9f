"""The single-process backend: k2-core's default for the `backend` slot."""

from __future__ import annotations

from typing import Any

import torch


class SingleProcessBackend:
    """Runs everything in this process on one device; rank 0 of a world of 1."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def prepare(self, model: torch.nn.Module, *rest: Any) -> tuple[Any, ...]:
        """Move the model to the device; optimizer and loader pass through unchanged."""
        return (model.to(self.device), *rest)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Max over ranks (the identity with one rank)."""
        return t
