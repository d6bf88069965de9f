"""Named slots of implementations: each a name, a factory and the pydantic model of its options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Registration:
    """One implementation of a slot."""

    slot: str
    name: str
    factory: Callable[..., Any]
    options: type[BaseModel]
    plugin: str
    distribution: str
    version: str
    doc: str = ""


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
        factory: Callable[..., Any],
        options: type[BaseModel] | None = None,
        *,
        doc: str | None = None,
        _origin: tuple[str, str, str] = ("?", "?", "?"),
    ) -> None:
        """Add `factory` as implementation `name` of `slot`; `options` validates its options."""
        if slot not in self._slots:
            raise PluginError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
        if name in self._slots[slot]:
            prev = self._slots[slot][name]
            raise PluginError(
                f"{slot} {name!r} registered twice (by {prev.distribution} and {_origin[1]})"
            )
        text = doc if doc is not None else (factory.__doc__ or "").strip().split("\n")[0]
        plugin, dist, version = _origin
        self._slots[slot][name] = Registration(
            slot, name, factory, options or NoOptions, plugin, dist, version, text
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

    def options(self, slot: str, name: str, values: Mapping[str, Any] | BaseModel | None,
                where: str = "") -> BaseModel:
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

    def build(self, slot: str, name: str, *args: Any, options: Any = None, where: str = "",
              **kwargs: Any) -> Any:
        """Call the factory of `slot`/`name` with validated options and the given arguments."""
        opts = self.options(slot, name, options, where)
        return self.get(slot, name).factory(*args, options=opts, **kwargs)


class PluginRegistry:
    """What a plugin's `k2_register` receives: registers under that plugin's distribution."""

    def __init__(self, registry: Registry, plugin: str, distribution: str, version: str):
        self._registry = registry
        self._origin = (plugin, distribution, version)

    def register(self, slot: str, name: str, factory: Callable[..., Any],
                 options: type[BaseModel] | None = None, *, doc: str | None = None) -> None:
        """Add `factory` as implementation `name` of `slot`; `options` validates its options."""
        self._registry.register(slot, name, factory, options, doc=doc, _origin=self._origin)

    def register_section(self, name: str, model: type[BaseModel]) -> None:
        """Declare a plugin-owned config section `plugins.<name>`."""
        self._registry.register_section(name, model, _origin=self._origin)
