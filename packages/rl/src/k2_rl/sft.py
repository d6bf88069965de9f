"""The `sft` stage: supervised fine-tuning of a k2 checkpoint on chat data.

The orchestrator does the loop (MuonClip by default, mlflow, checkpoints, resume) under any
backend (`parallel.backend=h800` under torchrun: DP, EP, PP, ZeRO-1); this stage
takes the model architecture and weights from `plugins.sft.init`, and the tokenizer from the
run that wrote it, which it records in `data.options.tokenizer` and saves beside every
checkpoint so later stages (RL, engines, `k2 serve`) find it.
"""

from __future__ import annotations

from typing import Any

from k2_core.config import RunConfig
from k2_core.errors import ConfigError

from .options import SftOptions


def prepare_sft_config(cfg: RunConfig) -> tuple[RunConfig, str, Any]:
    """(config with the init checkpoint's model and tokenizer, the init checkpoint's URI, the
    tokenizer); only the checkpoint's configs are read here, no weights."""
    from k2_core.modelio import checkpoint_configs

    from .chat_data import load_tokenizer_of, tokenizer_uri_of
    from .checkpoints import resolve_checkpoint

    if "sft" not in cfg.plugins:
        raise ConfigError(
            "plugins.sft.init: missing; name the checkpoint to fine-tune "
            "(e.g. plugins.sft.init=runs/tiny)"
        )
    opts = SftOptions.model_validate(cfg.plugins["sft"])
    init = resolve_checkpoint(opts.init)
    model_cfg, moe_cfg, init_cfg = checkpoint_configs(init)
    data_opts = dict(cfg.data.options)
    tok_uri = data_opts.get("tokenizer") or _beside(init) or tokenizer_uri_of(init_cfg)
    tokenizer = load_tokenizer_of(init_cfg, tok_uri)
    if cfg.data.dataset == "chat":
        data_opts["tokenizer"] = tok_uri
    plugins = {**cfg.plugins, "sft": {**cfg.plugins["sft"], "init": init}}
    cfg = cfg.model_copy(
        update={
            "model": model_cfg,
            "moe": moe_cfg,
            "plugins": plugins,
            "data": cfg.data.model_copy(update={"options": data_opts}),
        }
    )
    return cfg, init, tokenizer


def _beside(uri: str) -> str | None:
    import fsspec

    tok = f"{uri.rstrip('/')}/tokenizer"
    fs, path = fsspec.core.url_to_fs(tok)
    return tok if fs.exists(f"{path}/k2_tokenizer.json") else None


def run_sft(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Fine-tune `plugins.sft.init` under `cfg`; returns the orchestrator's summary."""
    from k2_core.orchestrator import build_run, train
    from k2_core.plugins import get_plugins
    from k2_core.trainstate import load_weights

    from .checkpoints import TokenizerBesideHooks, attach_hooks

    cfg, init, tokenizer = prepare_sft_config(cfg)
    plugins = get_plugins()
    run = build_run(cfg, plugins)
    if run.step == 0:  # a fresh run starts from the init weights; a resumed one has its own
        load_weights(init, run.model)  # each process reads only what it holds (any backend)
    attach_hooks(plugins, TokenizerBesideHooks(tokenizer), "k2-rl-tokenizer")
    if not progress:
        return train(run)
    from k2_core.progress import TrainProgress

    with TrainProgress(cfg.train.steps, run.step) as bar:
        return train(run, bar)


def build_sft_stage(*, options: Any) -> Any:
    """The `sft` stage: a callable RunConfig -> summary."""
    return run_sft
