"""Fixtures of the hw-h800 tests."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _restore_process_env():
    """In-process reference runs set process-wide variables (backend_runs.use_env); undo them
    after each module (bug: K2_LOAD_PLUGINS leaked into later tests of the same xdist worker,
    hiding k2-rl)."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)
