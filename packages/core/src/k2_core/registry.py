"""Named slots of implementations: each a name, a factory and the pydantic model of its options.

A factory is a callable or a `"module:attr"` reference to one. A reference is imported on
first build, not at registration, so plugins register without importing torch or their
implementation modules (`k2 --help` loads every plugin). Its description for `k2 plugins` is
read from the module's source without importing it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, PluginError

SLOTS: tuple[str, ...] = (
    "attention",
    "ffn",
    "router",
    "optimizer",
    "lr_schedule",
    "tokenizer",
    "dataset",
    "generator",
    "synthesizer",
    "reward",
    "rl_algorithm",
    "backend",
    "tracker",
    "stage",
    "command",
)


class NoOptions(BaseModel):
    """Options model of an implementation that takes none."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _module_source(module: str) -> str | None:
    """The source file of `module`, found without importing it or its parent packages."""
    parts = module.split(".")
    path: list[str] | None = None
    origin: str | None = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        if loaded is not None:
            path, origin = getattr(loaded, "__path__", None), getattr(loaded, "__file__", None)
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or []) or None
        origin = spec.origin
    return origin if origin and origin.endswith(".py") else None


def _reference_doc(ref: str) -> str | None:
    """The docstring summary of `"module:attr"` read from source; None when that is not cheap."""
    module, _, attr = ref.partition(":")
    if module in sys.modules:
        return _summary(getattr(_getattr_path(sys.modules[module], attr), "__doc__", None))
    source = _module_source(module)
    if source is None or "." in attr:
        return None
    try:
        with open(source, encoding="utf-8") as f:
            tree = ast.parse(f.read(), source)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == attr
        ):
            return _summary(ast.get_docstring(node))
    return None  # defined some other way (imported, assigned): resolve when asked


def _getattr_path(obj: Any, attr: str) -> Any:
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj


@dataclass(frozen=True)
class Registration:
    """One implementation of a slot: `target` is its factory or a `"module:attr"` reference."""

    slot: str
    name: str
    target: Callable[..., Any] | str
    options: type[BaseModel]
    plugin: str
    distribution: str
    version: str
    given_doc: str | None = None

    @cached_property
    def factory(self) -> Callable[..., Any]:
        """The factory, importing a `"module:attr"` reference on first use."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attr = self.target.partition(":")
        where = f"plugin {self.plugin}: {self.slot} {self.name!r}: reference {self.target!r}"
        try:
            obj: Any = importlib.import_module(module)
        except Exception as e:
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            raise PluginError(f"{where}: cannot import {module} ({why})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise PluginError(f"{where}: {module} has no attribute {attr!r}") from None
            obj = getattr(obj, part)
        if not callable(obj):
            raise PluginError(f"{where}: {attr} is a {type(obj).__name__}, not callable")
        return obj

    @cached_property
    def doc(self) -> str:
        """One-line description: the given doc, else the factory's docstring summary.

        A reference's docstring is read from its module's source without importing it; only
        when that fails (an attribute not defined by a def or class) is the reference imported.
        """
        if self.given_doc is not None:
            return self.given_doc
        if not isinstance(self.target, str):
            return _summary(self.target.__doc__)
        text = _reference_doc(self.target)
        if text is not None:
            return text
        try:
            return _summary(self.factory.__doc__)
        except PluginError:
            return ""


@dataclass
class Registry:
    """All registrations, by slot then name, plus config sections owned by plugins."""

    _slots: dict[str, dict[str, Registration]] = field(
        default_factory=lambda: {s: {} for s in SLOTS}
    )
    _sections: dict[str, tuple[type[BaseModel], str]] = field(default_factory=dict)  # model, plugin

    def register(
        self,
        slot: str,
        name: str,
        factory: Callable[..., Any] | str,
        options: type[BaseModel] | None = None,
        *,
        doc: str | None = None,
        _origin: tuple[str, str, str] = ("?", "?", "?"),
    ) -> None:
        """Add `factory` (a callable or a lazy `"module:attr"` reference) as `name` of `slot`."""
        if isinstance(factory, str) and not _REF.match(factory):
            raise PluginError(
                f"plugin {_origin[0]}: {slot} {name!r}: reference {factory!r} is "
                "not of the form 'package.module:attr'"
            )
        if not isinstance(factory, str) and not callable(factory):
            raise PluginError(
                f"plugin {_origin[0]}: {slot} {name!r}: factory must be callable "
                f"or a 'module:attr' reference, got {type(factory).__name__}"
            )
        if slot not in self._slots:
            raise PluginError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
        if name in self._slots[slot]:
            prev = self._slots[slot][name]
            raise PluginError(
                f"{slot} {name!r} registered twice (by {prev.distribution} and {_origin[1]})"
            )
        plugin, dist, version = _origin
        self._slots[slot][name] = Registration(
            slot, name, factory, options or NoOptions, plugin, dist, version, doc
        )

    def drop_plugin(self, plugin: str) -> None:
        """Remove everything `plugin` registered (its k2_register failed part-way)."""
        for slot in self._slots.values():
            for name in [n for n, r in slot.items() if r.plugin == plugin]:
                del slot[name]
        for name in [n for n, (_, p) in self._sections.items() if p == plugin]:
            del self._sections[name]

    def register_section(
        self, name: str, model: type[BaseModel], *, _origin: tuple[str, str, str] = ("?", "?", "?")
    ) -> None:
        """Declare a plugin-owned config section `plugins.<name>` validated by `model`."""
        self._sections[name] = (model, _origin[0])

    def get(self, slot: str, name: str) -> Registration:
        """The registration `name` of `slot`; an unknown name lists the names that exist."""
        if slot not in self._slots:
            raise PluginError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
        try:
            return self._slots[slot][name]
        except KeyError:
            have = ", ".join(sorted(self._slots[slot])) or "none registered"
            raise PluginError(f"no {slot} named {name!r}; available: {have}") from None

    def names(self, slot: str) -> list[str]:
        """Sorted implementation names of `slot`."""
        return sorted(self._slots[slot])

    def registrations(self) -> list[Registration]:
        """Every registration, sorted by slot then name."""
        return [r for s in SLOTS for _, r in sorted(self._slots[s].items())]

    def sections(self) -> dict[str, type[BaseModel]]:
        """Plugin-owned config sections and their models."""
        return {k: v[0] for k, v in self._sections.items()}

    def options(
        self, slot: str, name: str, values: Mapping[str, Any] | BaseModel | None, where: str = ""
    ) -> BaseModel:
        """Validate `values` against the options model of `slot`/`name`."""
        reg = self.get(slot, name)
        if isinstance(values, reg.options):
            return values
        values = dict(values or {})
        known = {a for n, f in reg.options.model_fields.items() for a in (n, f.alias) if a}
        unknown = sorted(set(values) - known)
        if unknown:  # a typo in any plugin's option fails, whatever its model's extra policy
            where_key = f"{where}.{unknown[0]}" if where else unknown[0]
            valid = ", ".join(reg.options.model_fields) or "none"
            raise ConfigError(f"{where_key}: unknown option of {slot} {name!r}; valid: {valid}")
        try:
            return reg.options.model_validate(values)
        except ValidationError as e:
            from .configio import describe_validation_error

            raise ConfigError(describe_validation_error(e, prefix=where)) from None

    def build(
        self, slot: str, name: str, *args: Any, options: Any = None, where: str = "", **kwargs: Any
    ) -> Any:
        """Call the factory of `slot`/`name` with validated options and the given arguments."""
        opts = self.options(slot, name, options, where)
        return self.get(slot, name).factory(*args, options=opts, **kwargs)


class PluginRegistry:
    """What a plugin's `k2_register` receives: registers under that plugin's distribution."""

    def __init__(self, registry: Registry, plugin: str, distribution: str, version: str):
        self._registry = registry
        self._origin = (plugin, distribution, version)

    def register(
        self,
        slot: str,
        name: str,
        factory: Callable[..., Any] | str,
        options: type[BaseModel] | None = None,
        *,
        doc: str | None = None,
    ) -> None:
        """Add `factory` (a callable or a lazy `"module:attr"` reference) as `name` of `slot`."""
        self._registry.register(slot, name, factory, options, doc=doc, _origin=self._origin)

    def register_section(self, name: str, model: type[BaseModel]) -> None:
        """Declare a plugin-owned config section `plugins.<name>`."""
        self._registry.register_section(name, model, _origin=self._origin)
