"""A run whose training state cannot fit this machine is refused before anything is allocated
(issue 15), with the figures; parallel.memory_check=false goes ahead anyway."""

from __future__ import annotations

import resource

import pytest
from k2_core import memcheck
from k2_core.configio import load_config
from k2_core.errors import ConfigError
from k2_core.orchestrator import build_run

OFF = ["tracking.tracker=null", "train.eval_every=0"]


def test_k2_1t_is_refused_in_one_line_before_allocation(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config("k2-1t", [*OFF, f"checkpoint.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        build_run(cfg)
    msg = str(e.value).strip()
    assert len(msg.splitlines()) == 1 and "parallel.memory_check: this process would hold" in msg
    assert "TB of weights, gradients and optimizer state" in msg and "memory_check=false" in msg
    assert not (tmp_path / "run").exists()
    # nothing was allocated: the process grew by far less than one layer of k2-1t
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB


def test_memory_check_false_goes_ahead(tmp_path, monkeypatch):
    monkeypatch.setattr(memcheck, "host_memory_bytes", lambda: 1 << 20)  # a 1 MiB machine
    cfg = [*OFF, "model.num_hidden_layers=1", f"checkpoint.dir={tmp_path}"]
    with pytest.raises(ConfigError, match="this process would hold"):
        build_run(load_config("tiny", cfg))
    run = build_run(load_config("tiny", [*cfg, "parallel.memory_check=false"]))
    assert sum(p.numel() for p in run.model.parameters()) > 0


def test_h800_counts_the_processes_of_this_host(monkeypatch, tmp_path):
    """The h800 backend's share per local process follows its layout and dtype policy."""
    import torch.distributed as dist
    from k2_core.plugins import get_plugins

    monkeypatch.setenv("K2_LOAD_PLUGINS", "optim,moe,data,hw_h800")
    for k, v in dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    ).items():
        monkeypatch.setenv(k, v)
    try:
        cfg = load_config(
            "k2-1t",
            ["parallel.backend=h800", "parallel.options.device=cpu", "parallel.options.dtype=bf16"],
        )
        backend = get_plugins().registry.build(
            "backend", "h800", options=cfg.parallel.options, where="parallel.options"
        )
        (bf16,) = backend.local_state_bytes(cfg)
        n = 1026.4e9
        # BF16 weights 2 + FP32 grads 4 + momentum 4 + master 4 bytes a parameter, about
        assert 13.5 * n < bf16 < 15 * n
        backend.dtype = "fp32"  # what dtype=fp32 (or auto at dp = 1) resolves to
        (fp32,) = backend.local_state_bytes(cfg)
        assert 11.5 * n < fp32 < 13 * n  # FP32 weights 4 + grads 4 + momentum 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
