"""The plugin manager through real entry points: failures recorded, allow-list honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from k2_core.plugins import load_plugins

ALL_DISTS = {"k2-core", "k2-moe", "k2-optim", "k2-data", "k2-rl", "k2-hw-h800"}


def test_workspace_plugins_load():
    pl = load_plugins()
    assert {p.distribution for p in pl.loaded} >= ALL_DISTS
    assert not pl.failures


def test_allow_list(monkeypatch):
    monkeypatch.setenv("K2_LOAD_PLUGINS", "optim")
    pl = load_plugins()
    assert {p.name for p in pl.loaded} == {"core", "optim"}
    assert "moe" in pl.skipped
    assert pl.registry.get("attention", "mla")  # built-ins always load


def _fake_dist(root: Path) -> None:
    """A distribution on sys.path with three k2 entry points: good, broken, misspelled hook."""
    (root / "good_plug.py").write_text(
        textwrap.dedent("""
        from k2_core import hookimpl
        @hookimpl
        def k2_register(registry):
            registry.register("reward", "fake_reward", lambda *, options: 1)
    """)
    )
    (root / "typo_plug.py").write_text(
        textwrap.dedent("""
        from k2_core import hookimpl
        @hookimpl
        def k2_on_stepend(run, step, metrics):
            pass
    """)
    )
    info = root / "fake_k2_plugins-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-k2-plugins\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[k2]\ngood = good_plug\nbroken = no_such_module_xyz\ntypo = typo_plug\n"
    )


@pytest.fixture
def env_with_fakes(tmp_path):
    _fake_dist(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("K2_LOAD_PLUGINS", None)
    return env


def _k2(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "k2_core.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_broken_plugins_are_recorded_and_break_nothing(env_with_fakes):
    out = _k2(env_with_fakes, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    failed = {f["name"]: f for f in data["failures"]}
    assert "ModuleNotFoundError" in failed["broken"]["error"]
    assert "k2_on_stepend" in failed["typo"]["error"]  # check_pending caught the misspelling
    assert failed["typo"]["distribution"] == "fake-k2-plugins"
    names = {r["name"]: r for r in data["slots"]["reward"]}
    assert names["fake_reward"]["distribution"] == "fake-k2-plugins"
    assert names["fake_reward"]["version"] == "0.3"
    # Other commands still work, with a one-line warning.
    show = _k2(env_with_fakes, "params", "tiny")
    assert show.returncode == 0 and "total" in show.stdout
    assert "failed to load: broken, typo" in show.stderr


def test_plugins_text_lists_everything(env_with_fakes):
    out = _k2(env_with_fakes, "plugins")
    assert out.returncode == 0
    assert "FAILED broken (fake-k2-plugins 0.3)" in out.stdout
    for dist in ALL_DISTS:
        assert dist in out.stdout


def test_lazy_references_through_entry_points(tmp_path):
    """A plugin registering `"module:attr"` references: nothing imported until built, and a
    broken command reference costs one warning line, not the other commands."""
    (tmp_path / "lazy_plug.py").write_text(
        textwrap.dedent("""
        from k2_core import hookimpl
        @hookimpl
        def k2_register(registry):
            registry.register("reward", "lazy_reward", "lazy_impl:build")
            registry.register("command", "lazy-broken", "no_such_module_xyz:cmd")
    """)
    )
    (tmp_path / "lazy_impl.py").write_text(
        'def build(*, options):\n    """A lazily imported reward."""\n    return 7\n'
    )
    info = tmp_path / "lazy_k2_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lazy-k2-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[k2]\nlazy = lazy_plug\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), K2_LOAD_PLUGINS="lazy")
    probe = textwrap.dedent("""
        import json, sys
        from k2_core.cli import build_parser
        from k2_core.plugins import get_registry
        build_parser()
        reg = get_registry()
        doc = reg.get("reward", "lazy_reward").doc
        before = "lazy_impl" in sys.modules
        print(json.dumps([doc, before, reg.build("reward", "lazy_reward"),
                          "lazy_impl" in sys.modules]))
    """)
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["A lazily imported reward.", False, 7, True]
    assert out.stderr.splitlines() == [
        "k2: warning: plugin error: plugin lazy: command 'lazy-broken': reference "
        "'no_such_module_xyz:cmd': cannot import no_such_module_xyz (ModuleNotFoundError: No "
        "module named 'no_such_module_xyz')"
    ]
    listing = _k2(env, "plugins")
    assert listing.returncode == 0
    assert "lazy_reward" in listing.stdout and "A lazily imported reward." in listing.stdout
    assert "lazy-broken" in listing.stdout and "lazy-k2-plugin" in listing.stdout


def test_builtin_plugin_module_and_its_deprecated_alias():
    """k2-core's built-in plugin is `k2_core.builtin_plugin` (the entry point says so);
    `k2_core.plugin` is the same module for a release, with a DeprecationWarning."""
    from importlib.metadata import entry_points

    import k2_core.builtin_plugin as builtin

    core = [ep for ep in entry_points(group="k2") if ep.name == "core"]
    assert [ep.value for ep in core] == ["k2_core.builtin_plugin"]
    assert load_plugins().pm.get_plugin("core") is builtin
    probe = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import k2_core.plugin\nexcept DeprecationWarning as e:\n    print(e)\n"
        "warnings.simplefilter('ignore')\n"
        "import k2_core.plugin, k2_core.builtin_plugin\n"
        "print(k2_core.plugin is k2_core.builtin_plugin)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "k2_core.plugin was renamed k2_core.builtin_plugin; the old name goes in the next release",
        "True",
    ]
