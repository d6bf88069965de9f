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
    return sorted(
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("k2_")
    )


def test_k2_register(rec):
    _, pl = rec
    reg = pl.registry.get("reward", "always_one")
    assert reg.plugin == "recorder" and reg.distribution == "recorder"
    assert pl.registry.build("reward", "always_one", options={"width": 5}) == 5
    # k2-core's own built-ins arrive through the same hook.
    assert pl.registry.get("attention", "mla").distribution == "k2-core"
    assert pl.registry.get("command", "plugins").plugin == "core"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of `train()` with a checkpoint after each, under the recorder; then a run
    that fails (non-finite steps up to max_bad_steps)."""
    from k2_core.orchestrator import TrainingError, train
    from toy_run import ToyPlugin, make

    r = Recorder()
    run = make(
        tmp_path_factory.mktemp("ok"),
        "train.steps=2",
        "checkpoint.every=1",
        "train.eval_every=0",
        "tracking.tracker=null",
        more=[("recorder", r)],
    )
    train(run)
    bad_plugin, bad = ToyPlugin(), Recorder()
    bad_plugin.poison_steps = {0, 1, 2}
    failing = make(
        tmp_path_factory.mktemp("bad"),
        "train.steps=3",
        "train.max_bad_steps=2",
        "model.dense_ffn=nan_swiglu",
        "model.first_k_dense_replace=1",
        "tracking.tracker=null",
        plugin=bad_plugin,
        more=[("recorder", bad)],
    )
    with pytest.raises(TrainingError):
        train(failing)
    return r, run, bad


def _names(calls):
    return [c[0] for c in calls]


def test_k2_on_run_start(trained):
    """`train()` opens with k2_on_run_start(run), before any step."""
    r, run, bad = trained
    assert r.calls[0] == ("k2_on_run_start", {"run": run})
    assert _names(bad.calls)[0] == "k2_on_run_start"


def test_k2_on_step_end(trained):
    """One k2_on_step_end per optimizer step, in order, with that step's metrics."""
    r, _, bad = trained
    steps = [c[1] for c in r.calls if c[0] == "k2_on_step_end"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all("train/loss" in s["metrics"] and "train/lr" in s["metrics"] for s in steps)
    # a skipped (non-finite) step still reports, with the skip count and no loss
    skipped = [c[1]["metrics"] for c in bad.calls if c[0] == "k2_on_step_end"]
    assert skipped and all(m == {"train/skipped_steps": i + 1} for i, m in enumerate(skipped))


def test_k2_on_checkpoint(trained):
    """After each step's k2_on_step_end, k2_on_checkpoint(step, uri) of a committed checkpoint."""
    from k2_core.checkpoint import is_committed

    r, _, bad = trained
    assert _names(r.calls) == [
        "k2_on_run_start",
        "k2_on_step_end",
        "k2_on_checkpoint",
        "k2_on_step_end",
        "k2_on_checkpoint",
        "k2_on_run_end",
    ]
    ckpts = [c[1] for c in r.calls if c[0] == "k2_on_checkpoint"]
    assert [c["step"] for c in ckpts] == [1, 2]
    assert all(is_committed(c["uri"]) and c["uri"].endswith(f"step_{c['step']:08d}") for c in ckpts)
    assert "k2_on_checkpoint" not in _names(bad.calls)


def test_k2_on_run_end(trained):
    """`train()` closes with k2_on_run_end: FINISHED, or FAILED when the run raised."""
    r, _, bad = trained
    assert r.calls[-1] == ("k2_on_run_end", {"status": "FINISHED"})
    assert bad.calls[-1] == ("k2_on_run_end", {"status": "FAILED"})


def test_k2_on_export(monkeypatch, tmp_path):
    """Broadcast by `k2 export-hf` after the weights; each plugin returns the files it wrote.
    k2-data's implementation writes the tokenizer files, or raises a one-line K2Error when the
    checkpoint has no tokenizer to find."""
    from k2_core.errors import K2Error

    monkeypatch.setenv("K2_LOAD_PLUGINS", "recorder")
    r = Recorder()
    pl = load_plugins(extra=[("recorder", r)])
    results = pl.hook.k2_on_export(
        src="memory://ck", run_config=None, dest=str(tmp_path), tokenizer=None
    )
    assert r.calls == [
        ("k2_on_export", {"src": "memory://ck", "dest": str(tmp_path), "tokenizer": None})
    ]
    assert results == [["recorded.json"]]
    monkeypatch.setenv("K2_LOAD_PLUGINS", "data")
    pl = load_plugins()
    if "data" in [p.name for p in pl.loaded]:
        with pytest.raises(K2Error, match="no tokenizer beside the weights"):
            pl.hook.k2_on_export(
                src=str(tmp_path / "ck"), run_config=None, dest=str(tmp_path), tokenizer=None
            )


def test_every_hook_has_a_test_and_docs():
    tests = "\n".join(p.read_text() for p in Path(__file__).parents[1].rglob("test_*.py"))
    readme = (Path(__file__).parents[2] / "packages" / "core" / "README.md").read_text()
    names = hook_names()
    assert names == [
        "k2_on_checkpoint",
        "k2_on_export",
        "k2_on_run_end",
        "k2_on_run_start",
        "k2_on_step_end",
        "k2_register",
    ]
    for name in names:
        assert re.search(rf"def test_{name}\b", tests), f"no test named test_{name}"
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert f"`{name}" in readme, f"{name} is not documented in packages/core/README.md"
