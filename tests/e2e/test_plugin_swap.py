"""Swapping a plugin for real: packages installed one at a time into fresh venvs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = os.environ.get("UV") or shutil.which("uv")

FORWARD = textwrap.dedent("""
    import json, torch
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.plugins import get_plugins
    # This venv has no optimizer or dataset plugins: check only what building a model needs.
    cfg = load_config("tiny", ["moe.router=softmax_topk", "model.num_hidden_layers=2"],
                      check={"model", "moe"})
    model = build_model(cfg)
    router = model.model.layers[1].mlp.gate
    out = model(torch.randint(0, cfg.model.vocab_size, (2, 16)))
    pl = get_plugins()
    print(json.dumps({
        "router": type(router).__module__,
        "shape": list(out.logits.shape),
        "finite": bool(torch.isfinite(out.logits).all()),
        "dists": sorted(p.distribution for p in pl.loaded),
        "registered_by": pl.registry.get("router", "softmax_topk").distribution,
    }))
""")


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.mark.slow
@pytest.mark.skipif(UV is None, reason="needs uv to build the fresh venv")
def test_softmax_router_plugin_from_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    _run([UV, "venv", "-q", str(venv), "--python", sys.executable])
    py = str(venv / "bin" / "python")
    _run(
        [
            UV,
            "pip",
            "install",
            "-q",
            "--python",
            py,
            str(ROOT / "packages/core"),
            str(ROOT / "packages/moe"),
            str(ROOT / "examples/k2-plugin-softmax-router"),
        ]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    data = json.loads(
        _run([py, "-c", FORWARD], env=env, cwd=tmp_path).stdout.strip().splitlines()[-1]
    )
    assert data["router"] == "k2_plugin_softmax_router.router"
    assert data["registered_by"] == "k2-plugin-softmax-router"
    assert data["shape"] == [2, 16, 8192] and data["finite"]
    # Only what was installed is there: no k2-optim, k2-data, ... in this venv.
    assert data["dists"] == ["k2-core", "k2-moe", "k2-plugin-softmax-router"]
    listing = _run([str(venv / "bin" / "k2"), "plugins"], env=env, cwd=tmp_path).stdout
    assert "softmax_topk" in listing and "k2-plugin-softmax-router" in listing
    bad = subprocess.run(
        [
            str(venv / "bin" / "k2"),
            "config",
            "show",
            "tiny",
            "moe.router=softmax_topk",
            "moe.router_options.renormalise=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "moe.router_options.renormalise: unknown option" in bad.stderr


@pytest.mark.slow
def test_pip_resolves_each_package_without_uv(tmp_path):
    """pip (no uv) resolves k2-moe's version range against k2-core from its folder."""
    report = tmp_path / "report.json"
    _run([sys.executable, "-m", "venv", str(tmp_path / "pv")])  # stdlib venv: pip, no uv
    pip = str(tmp_path / "pv" / "bin" / "pip")
    _run(
        [
            pip,
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--report",
            str(report),
            str(ROOT / "packages/core"),
            str(ROOT / "packages/moe"),
        ]
    )
    names = {i["metadata"]["name"] for i in json.loads(report.read_text())["install"]}
    assert {"k2-core", "k2-moe", "torch", "pluggy", "pydantic"} <= names
    for pkg in ("optim", "data", "rl", "hw-h800"):
        _run(
            [
                pip,
                "wheel",
                "--no-deps",
                "-q",
                "-w",
                str(tmp_path / "w"),
                str(ROOT / "packages" / pkg),
            ]
        )
    assert len(list((tmp_path / "w").glob("k2_*.whl"))) == 4
