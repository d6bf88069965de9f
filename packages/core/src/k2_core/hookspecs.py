"""The k2 hook surface, in lifecycle order. Plugins implement these with `k2_core.hookimpl`."""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "k2"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def k2_register(registry: Any) -> None:
    """Add named implementations to slots with `registry.register(slot, name, factory, options)`.

    `factory` is a callable or a `"package.module:attr"` reference to one, imported on first
    build (keep the plugin module import-light: every `k2` call, `--help` included, loads it).
    Called once per plugin by the plugin manager when it loads, before any command runs.
    """


@hookspec
def k2_on_run_start(run: Any) -> None:
    """A run is about to train; `run` holds its config, model and run folder.

    Broadcast by the orchestrator on every rank after set-up and before the first step.
    """


@hookspec
def k2_on_step_end(run: Any, step: int, metrics: dict[str, float]) -> None:
    """An optimizer step finished; `metrics` are that step's scalars.

    Broadcast by the orchestrator after each optimizer step (and the router bias update).
    """


@hookspec
def k2_on_checkpoint(run: Any, step: int, uri: str) -> None:
    """A checkpoint for `step` was committed at `uri`.

    Broadcast by the orchestrator once the checkpoint's commit marker is written.
    """


@hookspec
def k2_on_run_end(run: Any, status: str) -> None:
    """A run ended with `status` (`FINISHED`, `FAILED` or `KILLED`).

    Broadcast by the orchestrator once, also when the run fails or is interrupted.
    """


@hookspec
def k2_on_export(src: str, run_config: Any, dest: str, tokenizer: str | None) -> list[str] | None:
    """`k2 export-hf` wrote checkpoint `src` (its RunConfig `run_config`, or None) as a Hugging
    Face folder `dest`; add the files the folder needs beyond weights and config.json.

    Called by `k2 export-hf` once, after the weights are written. `tokenizer` is the tokenizer
    folder URI the user named (None: the checkpoint's own). k2-data writes the tokenizer, its
    chat template and generation_config.json. Returns the names of the files written; raises a
    `K2Error` when it cannot (a warning unless the user named `tokenizer`).
    """
