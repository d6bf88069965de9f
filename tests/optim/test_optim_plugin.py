"""k2_optim as a k2 plugin: registrations, option models, factories, a light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from k2_optim import Muon, MuonClip
from k2_optim.plugin import CosineOptions, MuonClipOptions, MuonOptions, WSDOptions
from optim_helpers import k2_tiny


def _registry():
    from k2_core.plugins import load_plugins

    return load_plugins().registry


def test_k2_register():
    reg = _registry()
    for slot, name, opts in (
        ("optimizer", "muon", MuonOptions),
        ("optimizer", "muonclip", MuonClipOptions),
        ("lr_schedule", "wsd", WSDOptions),
        ("lr_schedule", "cosine", CosineOptions),
    ):
        r = reg.get(slot, name)
        assert r.options is opts and r.distribution == "k2-optim" and r.doc
    model = k2_tiny(2)
    opt = reg.build(
        "optimizer",
        "muonclip",
        model,
        lr=1e-3,
        weight_decay=0.1,
        options={"qk_clip_tau": 50.0, "adamw_lr": 3e-4},
    )
    assert type(opt) is MuonClip and opt.qk_clip_tau == 50.0 and len(opt.qk_clip_targets) == 2
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "muon": 1e-3,
        "adamw": 3e-4,
        "adamw_no_decay": 3e-4,
    }
    muon = reg.build("optimizer", "muon", model, lr=1e-3, weight_decay=0.1, options={})
    assert type(muon) is Muon
    sched = reg.build(
        "lr_schedule",
        "wsd",
        opt,
        total_steps=100,
        options={"warmup_steps": 10, "decay_fraction": 0.2},
    )
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no grads: a no-op, keeps LambdaLR's order check quiet
        sched.step()
    assert lrs[9] == pytest.approx(1e-3) and lrs[79] == pytest.approx(1e-3)
    assert lrs[99] < 1.1e-4 and lrs[0] == pytest.approx(1e-4)
    cos = reg.build("lr_schedule", "cosine", muon, total_steps=50, options={"warmup_steps": 5})
    assert cos.get_last_lr()[0] == pytest.approx(2e-4)


def test_options_are_strict_and_documented():
    from k2_core.errors import ConfigError

    reg = _registry()
    with pytest.raises(ConfigError):
        reg.options("optimizer", "muonclip", {"qk_clip_tua": 10}, "optim.options")
    with pytest.raises(ConfigError):
        reg.options("lr_schedule", "wsd", {"min_lr_ratio": 2.0}, "optim.schedule_options")
    for model in (MuonOptions, MuonClipOptions, WSDOptions, CosineOptions):
        assert model.model_config["frozen"] and model.model_config["extra"] == "forbid"
        assert all(f.description for f in model.model_fields.values())


def test_distributed_option_needs_a_process_group():
    reg = _registry()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        reg.build(
            "optimizer",
            "muonclip",
            torch.nn.Linear(4, 4),
            lr=1e-3,
            weight_decay=0.0,
            options={"distributed": True},
        )


def test_plugin_import_is_light():
    code = "import sys, k2_optim.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_a_k2_model_with_muonclip_and_wsd():
    model = k2_tiny(2)
    model.set_record_max_logits(True)
    reg = _registry()
    opt = reg.build("optimizer", "muonclip", model, lr=3e-3, weight_decay=0.1, options={})
    sched = reg.build("lr_schedule", "wsd", opt, total_steps=8, options={"warmup_steps": 2})
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    losses = []
    for _ in range(8):
        if hasattr(model, "reset_max_logits"):
            model.reset_max_logits()
        out = model(ids, labels=torch.roll(ids, -1, 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        assert opt.last_clip_stats["per_layer_max"].shape == (2,)
    assert losses[-1] < losses[0]


def test_plugin_without_k2_core_says_which_extra():
    """k2-optim alone (no k2-core): the entry point's module fails with a line naming the `k2`
    extra, while the optimizers still import."""
    code = (
        "import sys\n"
        "sys.modules['k2_core'] = None\n"  # as if k2-core were not installed
        "import k2_optim\n"
        "try:\n"
        "    import k2_optim.plugin\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('k2_optim.plugin imported without k2_core')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "pip install 'k2-optim[k2]'" in out.stdout and "k2_core" in out.stdout


def test_pyproject_declares_the_k2_extra():
    """What plugin.py imports beyond torch is declared: the `k2` extra, bounded on k2-core."""
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[2] / "packages/optim/pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == ["torch>=2.9"]
    extra = meta["project"]["optional-dependencies"]["k2"]
    assert any(d.startswith("k2-core>=") and ",<" in d for d in extra)
    assert any(d.startswith("pydantic") for d in extra)
