"""The registry: named slots, option models, helpful errors."""

from __future__ import annotations

import pytest
from k2_core import ConfigError, PluginError
from k2_core.registry import SLOTS, PluginRegistry, Registry
from pydantic import BaseModel


class Opts(BaseModel):
    k: int = 2


def test_register_get_build():
    reg = Registry()
    PluginRegistry(reg, "p", "dist-p", "1.2").register("router", "r1", lambda *, options: options.k, Opts)
    r = reg.get("router", "r1")
    assert (r.plugin, r.distribution, r.version) == ("p", "dist-p", "1.2")
    assert reg.build("router", "r1", options={"k": 9}) == 9
    assert reg.names("router") == ["r1"]


def test_unknown_name_lists_what_exists():
    reg = Registry()
    reg.register("router", "b", lambda *, options: None)
    reg.register("router", "a", lambda *, options: None)
    with pytest.raises(PluginError, match=r"no router named 'zzz'; available: a, b"):
        reg.get("router", "zzz")


def test_bad_options_name_the_field():
    reg = Registry()
    reg.register("router", "r", lambda *, options: None, Opts)
    with pytest.raises(ConfigError, match=r"moe.router_options.k: must be an integer"):
        reg.build("router", "r", options={"k": "x"}, where="moe.router_options")
    with pytest.raises(ConfigError, match=r"moe.router_options.q: unknown option of router .r.; valid: k"):
        reg.build("router", "r", options={"q": 1}, where="moe.router_options")


def test_duplicate_and_unknown_slot_rejected():
    reg = Registry()
    reg.register("router", "r", lambda *, options: None)
    with pytest.raises(PluginError, match="registered twice"):
        reg.register("router", "r", lambda *, options: None)
    with pytest.raises(PluginError, match="unknown slot"):
        reg.register("nope", "r", lambda *, options: None)


def test_every_slot_is_filled_by_the_installed_plugins():
    """Behaviour, not a restatement of SLOTS: with every package installed, each slot of the
    house plan has at least one working implementation registered through the hooks."""
    from k2_core.plugins import load_plugins

    reg = load_plugins().registry
    empty = [slot for slot in SLOTS if not reg.names(slot)]
    assert not empty, f"slots nobody fills: {empty}"
