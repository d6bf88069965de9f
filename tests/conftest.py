"""Shared fixtures: a clean process-wide plugin cache per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under xdist (-n auto: one worker per core) a worker and the processes its test starts (k2
# commands, gloo ranks) use one thread each: torch's default of a thread per core in every
# process oversubscribed the box and made the multi-process tests several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take longest (measured; a scheduling hint only): under `--dist loadfile`
# files start in collection order, so these go first and no long file starts last, alone.
LONGEST_FIRST = [
    "e2e/test_pretrain_resume.py",
    "hw/test_deepspeed_engine.py",
    "core/test_compile.py",
    "hw/test_backend_train.py",
    "e2e/test_post_training.py",
    "e2e/test_plugin_swap.py",
    "rl/test_rl_backend.py",
    "rl/test_sft_backend.py",
    "hw/test_dry_run.py",
    "optim/test_optim_distributed.py",
    "hw/test_failfast.py",
    "core/test_tracking_server.py",
    "rl/test_lm_eval_adapter.py",
    "hw/test_bf16_policy.py",
    "hw/test_backend_pipeline.py",
    "e2e/test_hf_cli.py",
    "optim/test_optim_zero1_groups.py",
    "hw/test_expert_parallel.py",
    "rl/test_experiment_design.py",
    "hw/test_backend_eval.py",
    "hw/test_big_model.py",
]

# Test helper modules (rl_fixtures, serve_fixture, ...) live beside the tests that made them,
# shared ones (small_model) in tests/ itself; put every tests/ folder on the path so a test file
# run alone still finds them.
for _d in [
    Path(__file__).parent,
    *sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir()),
]:
    if str(_d) not in sys.path:
        sys.path.append(str(_d))


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees plugins loaded under its own environment (K2_LOAD_PLUGINS included)."""
    import k2_core.plugins as plugins

    monkeypatch.setattr(plugins, "_cached", None)
    yield


def pytest_collection_modifyitems(config, items):
    """Longest files first (LONGEST_FIRST, then files with slow or distributed tests), each
    file's tests in their own order: the parallel suite then ends on short files."""
    root = Path(__file__).parent
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    heavy = {
        item.path
        for item in items
        if item.get_closest_marker("slow") or item.get_closest_marker("distributed")
    }

    def key(item):
        rel = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if rel in rank:
            return (0, rank[rel])
        return (1 if item.path in heavy else 2, 0)

    items.sort(key=key)  # stable: the order inside each group and file is kept
