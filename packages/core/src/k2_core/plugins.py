"""The plugin manager: k2-core's built-ins, then the `k2` entry points, through the same hooks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from types import ModuleType

import pluggy

from . import hookspecs
from .registry import PluginRegistry, Registry

ENTRY_POINT_GROUP = "k2"
CORE_DIST = "k2-core"


@dataclass(frozen=True)
class PluginInfo:
    """A plugin that loaded: its entry-point name, distribution and version."""

    name: str
    distribution: str
    version: str


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not load or register, and why."""

    name: str
    distribution: str
    version: str
    error: str


@dataclass
class Plugins:
    """The loaded pluggy manager, the filled registry, and what loaded or failed."""

    pm: pluggy.PluginManager
    registry: Registry
    loaded: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hook relay, for broadcasting lifecycle hooks."""
        return self.pm.hook


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _allow_list() -> set[str] | None:
    raw = os.environ.get("K2_LOAD_PLUGINS")
    if raw is None or not raw.strip():
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def load_plugins(extra: list[tuple[str, ModuleType | object]] | None = None) -> Plugins:
    """Build a plugin manager: core built-ins, allowed entry points, then `extra` (for tests)."""
    from . import builtin_plugin as builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    out = Plugins(pm=pm, registry=Registry())
    origins: dict[str, PluginInfo] = {}

    def add(name: str, obj: object, dist: str) -> None:
        pm.register(obj, name=name)
        origins[name] = PluginInfo(name, dist, _version(dist))

    add("core", builtin, CORE_DIST)
    allow = _allow_list()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if dist == CORE_DIST or ep.name in origins:
            continue
        if allow is not None and ep.name not in allow and dist not in allow:
            out.skipped.append(ep.name)
            continue
        try:
            add(ep.name, ep.load(), dist)
        except Exception as exc:  # a broken plugin must not break k2
            out.failures.append(PluginFailure(ep.name, dist, _version(dist), _error_text(exc)))
    for name, obj in extra or []:
        add(name, obj, getattr(obj, "__k2_distribution__", name))

    # A misspelled hook implementation (k2_on_stepend, say) makes check_pending raise:
    # record the offending plugin as failed and drop it rather than hide the mistake.
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or "?"
            info = origins.pop(name, PluginInfo(name, "unknown", "unknown"))
            out.failures.append(PluginFailure(name, info.distribution, info.version, str(exc)))
            pm.unregister(exc.plugin)

    for impl in pm.hook.k2_register.get_hookimpls()[::-1]:  # pluggy keeps LIFO order
        info = origins[impl.plugin_name]
        scoped = PluginRegistry(out.registry, info.name, info.distribution, info.version)
        try:
            impl.function(registry=scoped)
        except Exception as exc:
            out.failures.append(
                PluginFailure(info.name, info.distribution, info.version, _error_text(exc))
            )
            out.registry.drop_plugin(info.name)
            pm.unregister(name=info.name)
            origins.pop(info.name)
    out.loaded = sorted(origins.values(), key=lambda p: (p.name != "core", p.name))
    return out


_cached: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, loaded on first use."""
    global _cached
    if _cached is None:
        _cached = load_plugins()
    return _cached


def get_registry() -> Registry:
    """The process-wide registry, filled by every loaded plugin."""
    return get_plugins().registry
