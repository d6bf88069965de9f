"""`k2 serve`'s weight updates: load a new policy version from a checkpoint URI the trainer wrote.

POST /update_weights_from_disk (SGLang's route name and body, so one client drives both):
`{"model_path": URI, "version": N}`. Allowed only when the server has an API key and the URI
lies under one of its `--weights-root`s; anything else is refused with 403 and one line. The
checkpoint (a saved model or a training checkpoint, checksums verified) is read off the event
loop, then copied into the engine under its lock: a generation in flight finishes on the
version it started with, the next one runs on the new one, and every completion carries the
version that generated it (`weights_version`).
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class UpdateWeightsRequest(BaseModel):
    """POST /update_weights_from_disk (unknown fields, e.g. SGLang's load_format, ignored)."""

    model_config = ConfigDict(extra="ignore")
    model_path: str = Field(..., min_length=1, description="URI of the checkpoint to load.")
    version: int | None = Field(None, ge=0, description="Version to serve it as (None: +1).")


def _split(uri: str) -> tuple[str, str]:
    """(protocol, normalised path); local paths resolved through symlinks and '..'."""
    from fsspec.core import split_protocol

    proto, path = split_protocol(uri)
    proto = proto or "file"
    if proto in ("file", "local"):
        return "file", os.path.realpath(os.path.expanduser(path))
    return proto, posixpath.normpath("/" + path.lstrip("/"))


def within_roots(uri: str, roots: tuple[str, ...] | list[str]) -> bool:
    """True when `uri` is one of `roots` or lies below one (same protocol, no '..' escape)."""
    proto, path = _split(uri)
    for root in roots:
        rproto, rpath = _split(root)
        if rproto == proto and (path == rpath or path.startswith(rpath.rstrip("/") + "/")):
            return True
    return False


class WeightLoader:
    """Loads checkpoints into a serving engine, one at a time, from allowed roots only."""

    def __init__(self, engine: Any, roots: tuple[str, ...], has_api_key: bool):
        self.engine, self.roots, self.has_api_key = engine, tuple(roots), has_api_key
        self._lock = threading.Lock()  # one load at a time (each holds a copy of the weights)
        self.loads = 0

    def refusal(self, uri: str) -> str | None:
        """Why loading `uri` is forbidden (403), or None when it is allowed."""
        if not self.has_api_key:
            return (
                "weight updates need the server's API key: start k2 serve with --api-key "
                "(or $K2_SERVE_API_KEY) and --weights-root"
            )
        if not self.roots:
            return "weight updates are off: start k2 serve with --weights-root DIR (repeatable)"
        if not within_roots(uri, self.roots):
            return (
                f"{uri} is outside the server's weight roots "
                f"({', '.join(self.roots)}; --weights-root)"
            )
        return None

    def load(self, uri: str, version: int | None) -> dict[str, Any]:
        """Read the checkpoint and switch the engine to it; raises ValueError (one line) when
        the checkpoint is unreadable or does not fit the served model."""
        import torch
        from k2_core.checkpoint import load_tensors
        from k2_core.errors import K2Error

        t0 = time.perf_counter()
        with self._lock:
            try:
                groups, _ = load_tensors(uri, ["model"])
            except (K2Error, OSError, KeyError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ValueError(f"cannot read the checkpoint at {uri}: {first}") from None
            state = groups.get("model", {})
            own = self.engine.model.state_dict()
            missing = sorted(set(own) - set(state))
            if missing or set(state) - set(own):
                what = (
                    f"missing {missing[0]}"
                    if missing
                    else f"unexpected {sorted(set(state) - set(own))[0]}"
                )
                raise ValueError(f"{uri}: its weights do not fit the served model ({what})")
            for name, t in state.items():
                if tuple(t.shape) != tuple(own[name].shape):
                    raise ValueError(
                        f"{uri}: {name} has shape {tuple(t.shape)}, the served "
                        f"model's is {tuple(own[name].shape)}"
                    )
            new = int(self.engine.version) + 1 if version is None else int(version)
            state = {k: v.to(own[k].dtype) for k, v in state.items()}
            with torch.no_grad():
                self.engine.load_weights(state, new)  # under the engine's lock: atomic
            self.loads += 1
        secs = time.perf_counter() - t0
        return {
            "success": True,
            "message": f"loaded {uri} as version {new} in {secs:.2f} s",
            "weights_version": new,
            "seconds": secs,
        }
