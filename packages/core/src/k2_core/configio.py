"""Loading configs: presets or YAML files over fsspec, dotted overrides, one-line errors."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import RunConfig
from .errors import ConfigError, K2Error
from .registry import Registry

PRESET_PACKAGE = "k2_core.presets"
DEFAULT_PRESET = "tiny"  # what a command without a config, or a file without `base:`, runs


def preset_names() -> list[str]:
    """Names of the presets shipped inside k2-core."""
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must hold a mapping of sections, got {type(data).__name__}")
    return data


def read_yaml_uri(uri: str) -> dict[str, Any]:
    """A YAML mapping from any fsspec URI; a missing, unreadable or malformed file is a
    ConfigError."""
    import fsspec

    try:
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{uri}: cannot read ({type(e).__name__}: {e})") from None
    return _read_yaml(text, uri)


def _load_source(spec: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file/URI, with `base:` resolved."""
    if spec in seen:
        raise ConfigError(f"{spec}: `base` chain loops ({' -> '.join(seen + (spec,))})")
    if spec in preset_names():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{spec}.yaml").read_text()
        data = _read_yaml(text, f"preset {spec}")
    elif spec.endswith((".yaml", ".yml", ".json")) or "/" in spec or "://" in spec:
        data = read_yaml_uri(spec)
    else:
        raise ConfigError(f"no preset or file named {spec!r}; presets: {', '.join(preset_names())}")
    base = data.pop("base", None)
    if base is None and spec not in preset_names():
        base = DEFAULT_PRESET  # a file without `base:` extends the one default, never k2-1t
    if base is None:
        return data
    return _merge(_load_source(str(base), seen + (spec,)), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_value(text: str) -> Any:
    """An override's value: int, float (3e-3 included), bool/null/list/dict via YAML, else str."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b.c=value` into a copy of `data`."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = out
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: is a value, not a section")
            node = nxt
        node[leaf] = parse_value(value)
    return out


_TEMPLATES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "missing": "is required",
}


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the (sub)model that `loc` points into, if it is a pydantic model."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        args = getattr(ann, "__args__", ()) or (ann,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return list(model.model_fields)


def describe_validation_error(
    e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """One line for the first error: `section.field: what is wrong (got X)`."""
    err = e.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    where = f"{prefix}.{where}" if prefix and where else (prefix or where or "config")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1]) if model else None
        hint = f"; valid keys: {', '.join(fields)}" if fields else ""
        return f"{where}: unknown key{hint}"
    if kind == "literal_error":
        msg = f"must be one of {ctx.get('expected', '?')}"
    elif kind in _TEMPLATES:
        nice = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
        msg = _TEMPLATES[kind].format(**nice)
    else:
        msg = err["msg"].removeprefix("Value error, ")
    if kind != "missing" and "got" not in msg and not isinstance(got, dict | list):
        msg += f" (got {got!r})" if isinstance(got, str) else f" (got {got})"
    return f"{where}: {msg}"


# Fields that name an implementation, with their slot and (optionally) their options field.
SLOT_FIELDS: tuple[tuple[str, str, str, str | None], ...] = (
    ("model", "attention", "attention", None),
    ("model", "dense_ffn", "ffn", None),
    ("moe", "ffn", "ffn", None),
    ("moe", "router", "router", "router_options"),
    ("optim", "name", "optimizer", "options"),
    ("optim", "schedule", "lr_schedule", "schedule_options"),
    ("data", "dataset", "dataset", "options"),
    ("parallel", "backend", "backend", "options"),
    ("tracking", "tracker", "tracker", "options"),
)


def check_plugins(cfg: RunConfig, registry: Registry, sections: set[str] | None = None) -> None:
    """Every implementation the config names (in `sections`, default all) exists, and its
    options validate."""
    has_moe = cfg.model.first_k_dense_replace < cfg.model.num_hidden_layers
    for section, field, slot, opts_field in SLOT_FIELDS:
        if (section == "moe" and not has_moe) or (sections is not None and section not in sections):
            continue
        sec = getattr(cfg, section)
        name = getattr(sec, field)
        if name is None:
            continue
        try:
            registry.get(slot, name)
        except K2Error as e:
            raise ConfigError(f"{section}.{field}: {e.args[0]}") from None
        if opts_field is not None:
            registry.options(slot, name, getattr(sec, opts_field), where=f"{section}.{opts_field}")
    sections = registry.sections()
    for name, values in cfg.plugins.items():
        if name not in sections:
            have = ", ".join(sorted(sections)) or "none registered"
            raise ConfigError(f"plugins.{name}: no plugin owns this section; sections: {have}")
        try:
            sections[name].model_validate(values)
        except ValidationError as e:
            raise ConfigError(
                describe_validation_error(e, f"plugins.{name}", sections[name])
            ) from None


def load_config(
    spec: str | None = None,
    overrides: list[str] | None = None,
    registry: Registry | None = None,
    check: set[str] | None = None,
) -> RunConfig:
    """Resolve a preset name or YAML file (default `tiny`) plus overrides into a RunConfig.

    `check` names the sections whose plugin choices must be installed (default: all), e.g.
    {"model", "moe"} to build a model where no optimizer or dataset plugin is installed.
    """
    data = apply_overrides(_load_source(spec or DEFAULT_PRESET), overrides or [])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, model=RunConfig)) from None
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    check_plugins(cfg, registry, check)
    return cfg


def dump_config(cfg: RunConfig, fmt: str = "yaml") -> str:
    """The config as YAML or JSON text, every field included."""
    data = cfg.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False)
