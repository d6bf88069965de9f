"""k2 core: config, plugin spine, the K2 model, HF interop, checkpoints and the `k2` CLI."""

from .config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from .errors import CheckpointError, ConfigError, K2Error, PluginError
from .hookspecs import hookimpl
from .registry import SLOTS, Registry

__version__ = "0.1.0"

__all__ = [
    "SLOTS",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "K2Error",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "PluginError",
    "Registry",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "hookimpl",
]
