"""k2-core's built-in implementations, registered through the same hook as any plugin.

Implementations in heavy modules are registered as `"module:attr"` references, imported on
first build, so that loading plugins (and `k2 --help`) stays fast.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .hookspecs import hookimpl


class AdamWOptions(BaseModel):
    """Options of the built-in AdamW (lr and weight decay come from the optim section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


def build_adamw(model: Any, *, lr: float, weight_decay: float, options: AdamWOptions) -> Any:
    """torch.optim.AdamW with decoupled weight decay over all of the model's parameters."""
    import torch

    return torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=options.betas, eps=options.eps
    )


def build_single_backend(*, options: BaseModel) -> Any:
    """One process, no parallelism: the model and batches stay where they are."""
    from .backend import SingleProcessBackend

    return SingleProcessBackend()


def build_constant_schedule(optimizer: Any, *, total_steps: int, options: BaseModel) -> Any:
    """A constant learning rate (no warm-up, no decay)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def build_pretrain_stage(*, options: BaseModel) -> Any:
    """Pre-training: next-token loss on packed sequences, with progress and a summary."""

    def run(cfg: Any) -> dict[str, Any]:
        from .orchestrator import build_run, train
        from .progress import TrainProgress

        r = build_run(cfg)
        with TrainProgress(cfg.train.steps, r.step) as progress:
            return train(r, progress)

    return run


def _mlflow_options() -> type[BaseModel]:
    from .tracking import MLflowOptions

    return MLflowOptions


@hookimpl
def k2_register(registry: Any) -> None:
    """Register k2-core's attention, dense FFN, optimizer, backend and CLI commands."""
    from . import commands

    registry.register("attention", "mla", "k2_core.model.attention:build_mla")
    registry.register("ffn", "swiglu", "k2_core.model.layers:build_swiglu")
    registry.register("optimizer", "adamw", build_adamw, AdamWOptions)
    registry.register("backend", "single", build_single_backend)
    registry.register("lr_schedule", "constant", build_constant_schedule)
    registry.register("stage", "pretrain", build_pretrain_stage)
    registry.register("tracker", "mlflow", "k2_core.tracking:build_mlflow", _mlflow_options())
    for name, factory in commands.CORE_COMMANDS.items():
        registry.register("command", name, factory)
