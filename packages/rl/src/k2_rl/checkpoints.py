"""Finding the checkpoint a stage starts from, and keeping its tokenizer beside the weights."""

from __future__ import annotations

from typing import Any

from k2_core.errors import CheckpointError
from k2_core.hookspecs import hookimpl


def resolve_checkpoint(uri: str) -> str:
    """`uri` itself when it is a checkpoint, else the newest one under `uri` or
    `uri/checkpoints`."""
    from k2_core.checkpoint import is_committed
    from k2_core.trainstate import list_checkpoints

    if is_committed(uri):
        return uri
    for root in (uri, f"{uri.rstrip('/')}/checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(
        f"{uri}: no checkpoint here (nor a run folder holding one); "
        "run the previous stage first or give a step_N URI"
    )


def save_tokenizer_beside(tokenizer: Any, uri: str) -> None:
    """Write the tokenizer to `uri/tokenizer`, where engines and `k2 serve` look for it."""
    tokenizer.save(f"{uri.rstrip('/')}/tokenizer")


class TokenizerBesideHooks:
    """A hook object: each new checkpoint of the run gets the tokenizer beside its weights."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @hookimpl
    def k2_on_checkpoint(self, run: Any, step: int, uri: str) -> None:
        """Save the tokenizer into the checkpoint folder just written."""
        save_tokenizer_beside(self.tokenizer, uri)


def attach_hooks(plugins: Any, obj: Any, name: str) -> None:
    """Register `obj` as hook implementations under `name` (replacing an earlier one)."""
    if plugins.pm.has_plugin(name):
        plugins.pm.unregister(name=name)
    plugins.pm.register(obj, name=name)
