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
    PluginRegistry(reg, "p", "dist-p", "1.2").register(
        "router", "r1", lambda *, options: options.k, Opts
    )
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
    with pytest.raises(
        ConfigError, match=r"moe.router_options.q: unknown option of router .r.; valid: k"
    ):
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


def _probe_module(tmp_path, monkeypatch, name: str) -> None:
    """A module `name` on sys.path whose factory doubles its option; importing it is visible."""
    (tmp_path / f"{name}.py").write_text(
        '"""A probe."""\n'
        "def build(*, options):\n"
        '    """Doubles k.\n\n    More text that is not the summary.\n    """\n'
        "    return 2 * options.k\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_reference_is_imported_on_first_build_only(tmp_path, monkeypatch):
    import sys

    _probe_module(tmp_path, monkeypatch, "k2_probe_lazy_ref")
    reg = Registry()
    PluginRegistry(reg, "p", "dist-p", "1.0").register(
        "router", "lazy", "k2_probe_lazy_ref:build", Opts
    )
    r = reg.get("router", "lazy")
    assert r.doc == "Doubles k."  # read from the source, not by importing it
    assert "k2_probe_lazy_ref" not in sys.modules
    assert reg.build("router", "lazy", options={"k": 4}) == 8
    assert "k2_probe_lazy_ref" in sys.modules
    assert r.factory is sys.modules["k2_probe_lazy_ref"].build


@pytest.mark.parametrize(
    "ref, why",
    [
        ("k2_no_such_module_xyz:build", "cannot import k2_no_such_module_xyz (ModuleNotFoundError"),
        ("k2_probe_bad_ref:nope", "k2_probe_bad_ref has no attribute 'nope'"),
    ],
)
def test_bad_reference_is_one_line_naming_plugin_slot_and_reference(
    tmp_path, monkeypatch, ref, why
):
    _probe_module(tmp_path, monkeypatch, "k2_probe_bad_ref")
    reg = Registry()
    PluginRegistry(reg, "myplug", "dist-p", "1.0").register("reward", "bad", ref)
    assert reg.get("reward", "bad").doc == ""  # listing a broken reference does not raise
    with pytest.raises(PluginError) as e:
        reg.build("reward", "bad")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"plugin error: plugin myplug: reward 'bad': reference {ref!r}: ")
    assert why in msg


@pytest.mark.parametrize("ref", ["no_colon", "a.b:", ":f", "a-b:f", "a:b:c"])
def test_malformed_reference_rejected_at_registration(ref):
    with pytest.raises(
        PluginError,
        match=r"plugin myplug: reward 'bad': reference .* not of the "
        r"form 'package.module:attr'",
    ):
        PluginRegistry(Registry(), "myplug", "d", "1").register("reward", "bad", ref)
