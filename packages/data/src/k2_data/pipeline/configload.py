"""Loading a synthesis command's config: a YAML file/URI (or dict) plus dotted overrides."""

from __future__ import annotations

from typing import Any, TypeVar

from k2_core.errors import ConfigError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_model_config(
    model: type[M], spec: str | dict[str, Any] | None, overrides: list[str] | None = None
) -> M:
    """`model` validated from YAML `spec` (None: empty) and `key.path=value` overrides."""
    from k2_core.configio import apply_overrides, describe_validation_error, read_yaml_uri

    if spec is None:
        data: dict[str, Any] = {}
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        data = read_yaml_uri(spec)
    data = apply_overrides(data, list(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, model=model)) from None
