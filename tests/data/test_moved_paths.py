"""The inference code moved to k2_data.inference; the old import paths still work for one
release, warn, and give the very same modules (so patches and isinstance checks agree)."""

from __future__ import annotations

import subprocess
import sys

import pytest

OLD_TO_NEW = {
    "k2_data.generation.engine": "k2_data.inference.engine",
    "k2_data.generation.batcher": "k2_data.inference.batcher",
    "k2_data.generation.sampling": "k2_data.inference.sampling",
    "k2_data.generation.resolve": "k2_data.inference.resolve",
    "k2_data.serve": "k2_data.inference.server",
    "k2_data.serve_weights": "k2_data.inference.weights",
    "k2_data.serve_command": "k2_data.inference.command",
}


@pytest.mark.parametrize("old,new", sorted(OLD_TO_NEW.items()))
def test_old_path_is_the_new_module_and_warns(old: str, new: str) -> None:
    """Each old path resolves to the new module object, with a DeprecationWarning naming both."""
    # a fresh interpreter: in this one the old path may already sit in sys.modules
    code = (
        "import importlib, warnings\n"
        "warnings.filterwarnings('error', '.*moved to k2_data', DeprecationWarning)\n"
        f"new = importlib.import_module({new!r})\n"
        "warnings.simplefilter('always', DeprecationWarning)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        f"    old = importlib.import_module({old!r})\n"
        "assert old is new, (old, new)\n"
        f"assert any({new!r} in str(w.message) for w in seen), [str(w.message) for w in seen]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_old_package_reexports_the_engine() -> None:
    """`from k2_data.generation import Engine` still gives the engine class."""
    import k2_data.inference as inference
    from k2_data.generation import Engine

    assert Engine is inference.Engine


def test_new_paths_import_without_deprecation_warnings() -> None:
    """Nothing in the package still imports through an old path."""
    code = (
        "import warnings\n"
        "warnings.filterwarnings('error', '.*moved to k2_data', DeprecationWarning)\n"
        "import k2_data.inference.server, k2_data.inference.command, k2_data.plugin\n"
        "import k2_data.generators.local, k2_data.hf_export\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
