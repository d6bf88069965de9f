"""Save and load a k2 model as a checkpoint (weights in zarr, configs as JSON attrs)."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import load_tensors, save_tensors
from .config import ModelConfig, MoEConfig, RunConfig
from .errors import CheckpointError


def save_model(
    model: torch.nn.Module,
    uri: str,
    *,
    run_config: RunConfig | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write the model's parameters and persistent buffers, with its configs, to `uri`."""
    meta = {
        "model_config": model.config.model_dump(mode="json"),
        "moe_config": model.moe_config.model_dump(mode="json"),
        **({"run_config": run_config.model_dump(mode="json")} if run_config else {}),
        **(attrs or {}),
    }
    save_tensors(uri, {"model": dict(model.state_dict())}, meta)


def _configs(uri: str, attrs: dict[str, Any]) -> tuple[ModelConfig, MoEConfig, RunConfig | None]:
    """The model's configs from a saved model (`model_config`) or a training checkpoint
    (`run_config`), and the RunConfig when recorded; one line when neither is valid."""
    try:
        run_cfg = RunConfig.model_validate(attrs["run_config"]) if "run_config" in attrs else None
        if "model_config" in attrs:
            return (
                ModelConfig.model_validate(attrs["model_config"]),
                MoEConfig.model_validate(attrs.get("moe_config", {})),
                run_cfg,
            )
    except ValueError as e:
        why = str(e).splitlines()[0]
        raise CheckpointError(f"{uri}: no valid model config in the checkpoint ({why})") from None
    if run_cfg is None:
        raise CheckpointError(
            f"{uri}: no model config recorded in the checkpoint (neither "
            "model_config nor run_config); is it a k2 checkpoint?"
        )
    return run_cfg.model, run_cfg.moe, run_cfg


def checkpoint_configs(uri: str) -> tuple[ModelConfig, MoEConfig, RunConfig | None]:
    """The model's configs (and the RunConfig when recorded) of a saved model or a training
    checkpoint, read from its attrs alone: no weight is loaded."""
    _, attrs = load_tensors(uri, [])
    return _configs(uri, attrs)


def load_model(
    uri: str,
    *,
    registry: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Rebuild the model a saved model or a training checkpoint describes and load its
    weights (checksums verified): the one loader of every command that takes a checkpoint."""
    from .model import K2ForCausalLM

    groups, attrs = load_tensors(uri, ["model"])
    mcfg, ecfg, _ = _configs(uri, attrs)
    # Built uninitialised on the target device: load_state_dict fills every persistent tensor,
    # and non-persistent buffers (rotary tables) are computed at construction.
    with torch.device(device):
        model = K2ForCausalLM(mcfg, ecfg, registry, init_weights=False)
    state = groups.get("model", {})
    missing = sorted(set(model.state_dict()) - set(state))
    extra = sorted(set(state) - set(model.state_dict()))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"{uri}: weights do not match the model ({what})")
    model.load_state_dict(state)
    return model.to(dtype=dtype) if dtype is not None else model


def load_checkpoint_model(
    uri: str, registry: Any = None
) -> tuple[torch.nn.Module, RunConfig | None]:
    """The model of a saved model or a training checkpoint (eval mode), and its RunConfig
    when recorded."""
    _, attrs = load_tensors(uri, [])
    run_cfg = _configs(uri, attrs)[2]
    return load_model(uri, registry=registry).eval(), run_cfg
