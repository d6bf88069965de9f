"""Every hook in k2_core.hookspecs has a test named after it here, and a test checks that."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from k2_core import hookimpl, hookspecs
from k2_core.plugins import load_plugins
from pydantic import BaseModel


class Recorder:
    """A plugin that records every lifecycle hook it receives."""

    __k2_distribution__ = "recorder"

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def k2_register(self, registry):
        class Opts(BaseModel):
            width: int = 3

        registry.register("reward", "always_one", lambda *, options: options.width, Opts)

    @hookimpl
    def k2_on_run_start(self, run):
        self.calls.append(("k2_on_run_start", {"run": run}))

    @hookimpl
    def k2_on_step_end(self, run, step, metrics):
        self.calls.append(("k2_on_step_end", {"step": step, "metrics": metrics}))

    @hookimpl
    def k2_on_checkpoint(self, run, step, uri):
        self.calls.append(("k2_on_checkpoint", {"step": step, "uri": uri}))

    @hookimpl
    def k2_on_run_end(self, run, status):
        self.calls.append(("k2_on_run_end", {"status": status}))

    @hookimpl
    def k2_on_export(self, src, run_config, dest, tokenizer):
        self.calls.append(("k2_on_export", {"src": src, "dest": dest, "tokenizer": tokenizer}))
        return ["recorded.json"]


@pytest.fixture
def rec():
    r = Recorder()
    return r, load_plugins(extra=[("recorder", r)])


def hook_names() -> list[str]:
    return sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
                  if n.startswith("k2_"))


def test_k2_register(rec):
    _, pl = rec
    reg = pl.registry.get("reward", "always_one")
    assert reg.plugin == "recorder" and reg.distribution == "recorder"
    assert pl.registry.build("reward", "always_one", options={"width": 5}) == 5
    # k2-core's own built-ins arrive through the same hook.
    assert pl.registry.get("attention", "mla").distribution == "k2-core"
    assert pl.registry.get("command", "plugins").plugin == "core"


def test_k2_on_run_start(rec):
    r, pl = rec
    pl.hook.k2_on_run_start(run="RUN")
    assert r.calls == [("k2_on_run_start", {"run": "RUN"})]


def test_k2_on_step_end(rec):
    r, pl = rec
    pl.hook.k2_on_step_end(run=None, step=7, metrics={"loss": 1.5})
    assert r.calls == [("k2_on_step_end", {"step": 7, "metrics": {"loss": 1.5}})]


def test_k2_on_checkpoint(rec):
    r, pl = rec
    pl.hook.k2_on_checkpoint(run=None, step=3, uri="memory://ck/3")
    assert r.calls == [("k2_on_checkpoint", {"step": 3, "uri": "memory://ck/3"})]


def test_k2_on_run_end(rec):
    r, pl = rec
    pl.hook.k2_on_run_end(run=None, status="FINISHED")
    assert r.calls == [("k2_on_run_end", {"status": "FINISHED"})]


def test_k2_on_export(monkeypatch, tmp_path):
    """Broadcast by `k2 export-hf` after the weights; each plugin returns the files it wrote.
    k2-data's implementation writes the tokenizer files, or raises a one-line K2Error when the
    checkpoint has no tokenizer to find."""
    from k2_core.errors import K2Error

    monkeypatch.setenv("K2_LOAD_PLUGINS", "recorder")
    r = Recorder()
    pl = load_plugins(extra=[("recorder", r)])
    results = pl.hook.k2_on_export(src="memory://ck", run_config=None, dest=str(tmp_path),
                                   tokenizer=None)
    assert r.calls == [("k2_on_export", {"src": "memory://ck", "dest": str(tmp_path),
                                         "tokenizer": None})]
    assert results == [["recorded.json"]]
    monkeypatch.setenv("K2_LOAD_PLUGINS", "data")
    pl = load_plugins()
    if "data" in [p.name for p in pl.loaded]:
        with pytest.raises(K2Error, match="no tokenizer beside the weights"):
            pl.hook.k2_on_export(src=str(tmp_path / "ck"), run_config=None, dest=str(tmp_path),
                                 tokenizer=None)


def test_every_hook_has_a_test_and_docs():
    tests = "\n".join(p.read_text() for p in Path(__file__).parents[1].rglob("test_*.py"))
    readme = (Path(__file__).parents[2] / "packages" / "core" / "README.md").read_text()
    names = hook_names()
    assert names == ["k2_on_checkpoint", "k2_on_export", "k2_on_run_end", "k2_on_run_start",
                     "k2_on_step_end", "k2_register"]
    for name in names:
        assert re.search(rf"def test_{name}\b", tests), f"no test named test_{name}"
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert f"`{name}" in readme, f"{name} is not documented in packages/core/README.md"
