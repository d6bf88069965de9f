"""k2_optim.deepspeed_zero: K2's MuonClip update as DeepSpeed ZeRO-1 applies it (one process,
no engine): the direction written into .grad plus the inner optimizer's step reproduce
MuonClip.step(); and why DeepSpeed's own ZeRO Muon could not be used with a per-shape lr
multiplier (it cannot orthogonalise the gate/up halves of a fused expert tensor apart).
The 2-process DeepSpeed engine runs are in tests/hw/test_deepspeed_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from optim_helpers import TinyLM


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _loss(model: TinyLM, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("nesterov,adjust", [(True, "match_rms_adamw"), (False, "original")])
def test_direction_plus_inner_step_equals_muonclip(world_of_one, nesterov, adjust):
    from k2_optim import MuonClip, param_groups
    from k2_optim.deepspeed_zero import DeepSpeedMuonClip

    torch.manual_seed(0)
    ref_model = TinyLM()
    ds_model = TinyLM()  # deepcopy would drop the parameters' muon_split attribute
    ds_model.load_state_dict(ref_model.state_dict())
    kw = dict(
        nesterov=nesterov,
        adjust_lr_fn=adjust,
        adamw_betas=(0.8, 0.9),
        adamw_eps=1e-6,
        qk_clip=False,
        ns_dtype=torch.float32,
    )
    ref = MuonClip(param_groups(ref_model, 0.02, 0.1), 0.02, 0.1, **kw)
    opt = DeepSpeedMuonClip(param_groups(ds_model, 0.02, 0.1), 0.02, 0.1, **kw)
    # the inner optimizer's groups mirror the outer ones (DeepSpeed swaps in flat partitions)
    assert [g["use_muon"] for g in opt.inner.param_groups] == [
        g["use_muon"] for g in opt.param_groups
    ]
    for step in range(3):
        _loss(ref_model, step).backward()
        ref.step()
        ref.zero_grad()
        _loss(ds_model, step).backward()
        opt.write_directions()
        opt.inner.step()
        opt.zero_grad()
    # the two orders of scaling the direction (into .grad, or in the update's alpha) differ
    # in the last FP32 bit; AdamW entries whose sqrt(v) is below eps amplify that by orders
    # of magnitude (one embedding entry: ~3e-6 after 3 steps, 1/7000 of an lr step)
    for (n, a), b in zip(ref_model.named_parameters(), ds_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    # K2's momentum lives outside DeepSpeed's state, in the single-process layout
    torch.testing.assert_close(
        opt.state[ds_model.gate_up]["momentum_buffer"],
        ref.state[ref_model.gate_up]["momentum_buffer"],
    )


def test_deepspeed_muon_cannot_split_fused_blocks():
    """DeepSpeed's ZeRO Muon times K2-scale / DeepSpeed-scale matches K2 on plain matrices
    (its (1-mu)-scaled momentum is removed by Newton-Schulz's normalisation) but not on a
    `muon_split` expert tensor: the reason DeepSpeedMuonClip computes the update itself."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.muon.original_muon import _aspect_ratio_scale, muon_update
    from k2_optim.muon import adjusted_scale
    from k2_optim.orthogonalize import newton_schulz

    torch.manual_seed(0)
    grads = [torch.randn(3, 32, 16) for _ in range(3)]
    k2_m = torch.zeros(3, 32, 16)
    ds_m = torch.zeros(3, 32, 16)
    with torch.compiler.set_stance("force_eager"):  # its torch.compile is minutes on CPU
        for g in grads:
            k2_m.mul_(0.95).add_(g)
            u = g + 0.95 * k2_m
            ds = muon_update(
                g.clone(), ds_m, beta=0.95, ns_method="standard", is_expert_group=True
            ).float()
            ds *= adjusted_scale(32, 16, "match_rms_adamw") / _aspect_ratio_scale(32, 16)
            whole = newton_schulz(u, out_dtype=torch.float32) * adjusted_scale(
                32, 16, "match_rms_adamw"
            )
            split = newton_schulz(u.reshape(6, 16, 16), out_dtype=torch.float32).reshape(
                3, 32, 16
            ) * adjusted_scale(16, 16, "match_rms_adamw")
            rel_whole = float((ds - whole).norm() / whole.norm())
            rel_split = float((ds - split).norm() / split.norm())
            assert rel_whole < 0.06, rel_whole  # same update up to bf16 Newton-Schulz
            assert rel_split > 0.3, rel_split  # K2's gate/up blocks: a different update


def test_deepspeed_config_is_zero1_fp32():
    from k2_optim.deepspeed_zero import deepspeed_config

    cfg = deepspeed_config({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0})
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["gradient_clipping"] == 0.0  # K2 clips the raw gradient before the momentum
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32"
    with pytest.raises(ValueError, match="stage 1"):
        deepspeed_config({"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="bf16.enabled"):
        deepspeed_config({"bf16": {"enabled": True}})


def test_module_imports_without_deepspeed_use():
    """Importing k2_optim (and its DeepSpeed module) does not import deepspeed."""
    import subprocess
    import sys

    code = (
        "import sys, k2_optim; k2_optim.DeepSpeedMuonClip; "
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
