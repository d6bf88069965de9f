"""The `h800` backend's options and its one-line errors (one gloo process, no spawning)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from k2_core.errors import ConfigError, K2Error
from small_model import small_model


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_options_validate_and_register():
    from k2_core.plugins import get_plugins
    from k2_hw_h800.options import H800Options

    reg = get_plugins().registry
    assert "h800" in reg.names("backend")
    assert H800Options().dp == "auto" and H800Options().zero_stage == 1
    with pytest.raises(ValueError):
        H800Options(ep=0)
    with pytest.raises(ValueError):
        H800Options(pipeline=2)  # unknown keys are refused


def test_layout_degrees_must_match_the_world(world_of_one):
    from k2_hw_h800.mesh import build_layout
    from k2_hw_h800.options import H800Options

    lay = build_layout(H800Options(), torch.device("cpu"))
    assert (lay.pp, lay.dp, lay.ep, lay.data_size, lay.data_rank) == (1, 1, 1, 1, 0)
    with pytest.raises(ConfigError, match="not a multiple of pp\\*ep"):
        build_layout(H800Options(ep=2), torch.device("cpu"))
    with pytest.raises(ConfigError, match="pp\\*dp\\*ep"):
        build_layout(H800Options(dp=2), torch.device("cpu"))


def test_backend_takes_deepspeed_for_data_parallel_only(world_of_one):
    from k2_hw_h800.backend import H800Backend
    from k2_hw_h800.options import H800Options

    assert H800Backend(H800Options(engine="deepspeed")).layout.dp == 1
    with pytest.raises(K2Error, match="engine=deepspeed supports data parallelism only"):
        H800Backend(H800Options(engine="deepspeed", pp=2))


def test_backend_needs_a_launcher(monkeypatch):
    from k2_hw_h800.mesh import init_process_group
    from k2_hw_h800.options import H800Options

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        init_process_group(H800Options(), torch.device("cpu"))


def test_ep_must_divide_the_experts(world_of_one):
    from k2_hw_h800.expert_parallel import shard_experts
    from k2_moe.moe import MoE
    from k2_moe.router import SigmoidRouter

    moe = MoE(16, 8, 6, SigmoidRouter(16, 6, 2))
    with pytest.raises(ConfigError, match="ep=4 must divide"):
        shard_experts(moe, 0, 4, dist.group.WORLD)


def _tiny_model():
    from k2_core.configio import load_config
    from k2_core.model import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", [*small_model(experts=4), "tracking.tracker=null"], check=set())
    return build_model(cfg).train()


def _tiny_meta_model():
    from k2_core.configio import load_config
    from k2_core.model import build_model

    cfg = load_config("tiny", [*small_model(experts=4), "tracking.tracker=null"], check=set())
    return build_model(cfg, device="meta").train()


def test_parallelize_applies_the_activation_policy(world_of_one):
    from k2_hw_h800.backend import H800Backend
    from k2_hw_h800.options import H800Options

    ids = torch.randint(0, 8192, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    plain = _tiny_model()
    want = plain(**batch, return_logits=False).loss
    want.backward()
    backend = H800Backend(H800Options(activation_policy={"recompute": True}, device="cpu"))
    model = backend.parallelize(_tiny_meta_model(), seed=0)
    assert model._k2_activation_policy.policy.recompute
    got = model(**batch, return_logits=False).loss
    got.backward()
    torch.testing.assert_close(got, want)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)
    with pytest.raises(ConfigError, match="invalid recompte"):
        H800Backend(H800Options(activation_policy={"recompte": True})).parallelize(
            _tiny_meta_model(), 0
        )
