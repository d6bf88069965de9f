"""Tool specs: validation as OpenAI-style JSON Schema function specs, deduplication, and real
Python functions turned into specs by a decorator."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from k2_core.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class SpecError(ValueError):
    """A tool spec that is not a valid function spec; `reason` names what is wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def validate_spec(spec: Any) -> dict[str, Any]:
    """The normalized `{"type": "function", "function": {name, description, parameters}}` of a
    spec given either wrapped or bare; SpecError (bad_name, no_description, bad_schema, ...)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(spec, dict) and spec.get("type") == "function" and "function" in spec:
        spec = spec["function"]
    if not isinstance(spec, dict):
        raise SpecError("not_object")
    name, desc = spec.get("name"), spec.get("description")
    params = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError("bad_name", repr(name))
    if not isinstance(desc, str) or not desc.strip():
        raise SpecError("no_description", name)
    if not isinstance(params, dict) or params.get("type") != "object":
        raise SpecError("bad_schema", "parameters must be a JSON Schema of type object")
    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as e:
        raise SpecError("bad_schema", e.message[:200]) from None
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise SpecError("bad_schema", "properties must be an object")
    missing = [r for r in params.get("required", []) if r not in props]
    if missing:
        raise SpecError("bad_schema", f"required names unknown properties {missing}")
    return {
        "type": "function",
        "function": {"name": name, "description": desc.strip(), "parameters": params},
    }


def spec_key(spec: dict[str, Any]) -> str:
    """The dedup key of a validated spec: its lowercased name."""
    return spec["function"]["name"].lower()


def check_arguments(spec: dict[str, Any], arguments: Any) -> str | None:
    """None if `arguments` satisfy the spec's parameters schema, else the first error."""
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(spec["function"]["parameters"])
    err = next(iter(v.iter_errors(arguments)), None)
    return None if err is None else err.message[:300]


# -- real tools --------------------------------------------------------------------------

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}


def _schema_of(tp: Any) -> tuple[dict[str, Any], bool]:
    """(JSON Schema, optional?) of a type hint."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        inner, opt = _schema_of(args[0])
        desc = next((a for a in args[1:] if isinstance(a, str)), None)
        return ({**inner, "description": desc} if desc else inner), opt
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner, _ = _schema_of(rest[0]) if len(rest) == 1 else ({}, False)
        return inner, type(None) in args
    if origin is typing.Literal:
        return {"enum": list(args)}, False
    if origin in (list, tuple, set):
        return {"type": "array", **({"items": _schema_of(args[0])[0]} if args else {})}, False
    if origin is dict:
        return {"type": "object"}, False
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}, False
    raise ConfigError(
        f"tool parameter type {tp!r} has no JSON Schema; use str, int, float, "
        "bool, list, dict, Literal or Optional of those"
    )


@dataclass(frozen=True)
class RealTool:
    """A Python function the agent may call for real, with its spec."""

    fn: Callable[..., Any]
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        """The function name in the spec."""
        return self.spec["function"]["name"]


_REAL: dict[str, RealTool] = {}


def tool(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Decorator: register a typed function as a real tool (spec from its signature and
    docstring; `Annotated[T, "help"]` describes a parameter). Returns the function unchanged."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(f, include_extras=True)
        props: dict[str, Any] = {}
        required: list[str] = []
        for pname, p in inspect.signature(f).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            schema, optional = _schema_of(hints.get(pname, str))
            props[pname] = schema
            if p.default is inspect.Parameter.empty and not optional:
                required.append(pname)
        doc = description or (inspect.getdoc(f) or "").split("\n\n")[0].strip()
        spec = validate_spec(
            {
                "name": name or f.__name__,
                "description": doc or f.__name__,
                "parameters": {"type": "object", "properties": props, "required": required},
            }
        )
        _REAL[spec["function"]["name"]] = RealTool(f, spec)
        return f

    return wrap(fn) if fn is not None else wrap


def real_tools() -> dict[str, RealTool]:
    """Every registered real tool, by name."""
    return dict(_REAL)


def load_real_tools(paths: list[str]) -> list[RealTool]:
    """Import `module:function` paths (registering them if the decorator has not); ConfigError
    naming a path that cannot be imported."""
    import importlib

    out = []
    for path in paths:
        mod, _, attr = path.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(
                f"real_tools: cannot import {path!r} ({type(e).__name__}); give module:function"
            ) from None
        found = next((t for t in _REAL.values() if t.fn is fn), None)
        if found is None:
            tool(fn)
            found = next(t for t in _REAL.values() if t.fn is fn)
        out.append(found)
    return out


def call_real(t: RealTool, arguments: dict[str, Any]) -> str:
    """Run a real tool; its JSON result, or a JSON error the agent can read."""
    try:
        return json.dumps({"result": t.fn(**arguments)}, default=str, ensure_ascii=False)
    except Exception as e:  # the tool's own failure is a result the agent must handle
        return json.dumps({"error": f"{type(e).__name__}: {e}"[:500]})
