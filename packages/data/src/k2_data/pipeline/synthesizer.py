"""What the `synthesizer` slot holds: a named synthesis job, its config model and its runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Synthesizer:
    """A synthesis job: `run(config_model.model_validate(data))` returns a summary with
    `.line()` and `.complete`; rerunning resumes."""

    name: str
    config_model: type[BaseModel]
    run: Callable[[Any], Any]

    def run_dict(self, data: dict[str, Any]) -> Any:
        """Validate `data` (ConfigError on a bad field) and run."""
        from .configload import load_model_config

        return self.run(load_model_config(self.config_model, data))
