"""k2_moe: router and MoE equal transformers' DeepseekV3, balancing, dispatch, registration."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from k2_core.registry import Registry
from k2_moe import MoE, MoEOptions, RouterOptions, SigmoidRouter, sequence_balance_loss
from k2_moe.plugin import k2_register
from moe_helpers import hf_config, small_configs


def _registry() -> Registry:
    reg = Registry()
    k2_register(reg)
    return reg


def _k2_moe(model, moe, **opts) -> MoE:
    reg = _registry()
    return reg.build("ffn", "moe", model, moe, 1, registry=reg, options=opts)


def _hf_moe(k2: MoE, model, moe, impl="eager"):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf = DeepseekV3MoE(hf_config(model, moe, impl))
    hf.load_state_dict(k2.state_dict(), strict=True)
    return hf


# --- registration --------------------------------------------------------------------------


def test_k2_register():
    reg = _registry()
    ffn = reg.get("ffn", "moe")
    router = reg.get("router", "sigmoid_noaux_tc")
    assert ffn.options is MoEOptions and router.options is RouterOptions
    model, moe = small_configs()
    r = reg.build("router", "sigmoid_noaux_tc", model, moe, options={})
    assert isinstance(r, SigmoidRouter)
    m = reg.build("ffn", "moe", model, moe, 3, registry=reg, options={"kernel": "loop"})
    assert isinstance(m, MoE) and m.layer_idx == 3
    from k2_core.model.protocols import LoadBalanced

    assert isinstance(m, LoadBalanced)


def test_k2_register_through_entry_point():
    from k2_core.plugins import load_plugins

    plugins = load_plugins()
    assert "moe" in plugins.registry.names("ffn")
    assert "sigmoid_noaux_tc" in plugins.registry.names("router")
    assert plugins.registry.get("ffn", "moe").distribution == "k2-moe"


def test_plugin_import_is_light():
    code = "import sys, k2_moe.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_option_is_a_config_error():
    from k2_core.errors import ConfigError

    reg = _registry()
    model, moe = small_configs()
    with pytest.raises(ConfigError):
        reg.build("ffn", "moe", model, moe, 1, registry=reg, options={"kernal": "loop"})


# --- router ----------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_router_equals_hf(groups):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    model, moe = small_configs(n_group=groups[0], topk_group=groups[1], experts=16, k=4)
    reg = _registry()
    k2 = reg.build("router", "sigmoid_noaux_tc", model, moe)
    with torch.no_grad():
        k2.e_score_correction_bias.normal_(0, 0.2)
    hf = DeepseekV3TopkRouter(hf_config(model, moe))
    hf.load_state_dict(k2.state_dict(), strict=True)
    x = torch.randn(64, model.hidden_size)
    idx, w, scores = k2(x)
    logits, hw, hidx = hf(x)
    assert idx.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(idx, hidx)
    assert torch.equal(w, hw)
    assert torch.equal(scores, logits.sigmoid())
    # the bias changes the choice but not the weights' source
    o = torch.sort(idx, dim=1)
    assert torch.allclose(o.values, torch.sort(hidx, dim=1).values)


def test_router_group_limit_is_respected():
    model, moe = small_configs(n_group=4, topk_group=2, experts=16, k=4)
    r = _registry().build("router", "sigmoid_noaux_tc", model, moe)
    idx, _, _ = r(torch.randn(256, model.hidden_size))
    groups_used = (idx // 4).sort(dim=1).values
    n_distinct = (groups_used.diff(dim=1) != 0).sum(dim=1) + 1
    assert int(n_distinct.max()) <= 2


def test_router_softmax_and_greedy():
    model, moe = small_configs(
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, experts=16, k=4
    )
    r = _registry().build("router", "sigmoid_noaux_tc", model, moe)
    with torch.no_grad():
        r.e_score_correction_bias.fill_(5.0)  # greedy ignores the bias
        r.e_score_correction_bias[0] = 100.0
    x = torch.randn(32, model.hidden_size)
    idx, w, scores = r(x)
    ref = (x @ r.weight.t()).softmax(-1)
    torch.testing.assert_close(scores, ref)
    top = ref.topk(4, dim=-1)
    assert torch.equal(idx.sort(1).values, top.indices.sort(1).values)
    torch.testing.assert_close(
        w.sort(1).values, (top.values * moe.routed_scaling_factor).sort(1).values
    )


def test_router_bias_update_sign_and_speed():
    model, moe = small_configs(experts=4, k=1)
    r = _registry().build("router", "sigmoid_noaux_tc", model, moe)
    r.update_bias(torch.tensor([10, 0, 5, 5]), 0.01)
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert r.e_score_correction_bias.dtype == torch.float32
    assert "e_score_correction_bias" in r.state_dict()


# --- MoE vs transformers --------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_moe_forward_and_grads_equal_hf(impl, kernel):
    model, moe = small_configs(n_group=4, topk_group=2, experts=16, k=4)
    k2 = _k2_moe(model, moe, kernel=kernel)
    with torch.no_grad():
        k2.gate.e_score_correction_bias.normal_(0, 0.1)
    hf = _hf_moe(k2, model, moe, impl)
    x = torch.randn(3, 40, model.hidden_size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = k2(x), hf(x2)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    hf_params = dict(hf.named_parameters())
    names = {n for n, _ in k2.named_parameters()}
    assert names == set(hf_params)
    for n, p in k2.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[n].grad, atol=1e-5, rtol=0, msg=n)


def test_moe_without_shared_experts():
    model, moe = small_configs(n_shared=0)
    k2 = _k2_moe(model, moe)
    assert k2.shared_experts is None
    assert not any(n.startswith("shared_experts") for n in k2.state_dict())
    assert k2(torch.randn(2, 5, model.hidden_size)).shape == (2, 5, model.hidden_size)


def test_param_names_and_shapes_are_hf():
    model, moe = small_configs()
    k2 = _k2_moe(model, moe)
    sd = k2.state_dict()
    e, i, h = moe.n_routed_experts, moe.moe_intermediate_size, model.hidden_size
    assert sd["gate.weight"].shape == (e, h) and sd["gate.weight"].dtype == torch.float32
    assert sd["gate.e_score_correction_bias"].shape == (e,)
    assert sd["experts.gate_up_proj"].shape == (e, 2 * i, h)
    assert sd["experts.down_proj"].shape == (e, h, i)
    assert "expert_counts" not in sd


def test_idle_experts_get_zero_grad_and_no_work(monkeypatch):
    model, moe = small_configs(experts=8, k=2, n_shared=0)
    k2 = _k2_moe(model, moe, kernel="loop")
    with torch.no_grad():  # force every token onto experts 0 and 1
        k2.gate.e_score_correction_bias.copy_(torch.tensor([10.0, 10.0] + [0.0] * 6))
    calls = []
    real_mm = torch.mm

    def counting_mm(a, b, *args, **kw):
        calls.append(a.shape[0])
        return real_mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "mm", counting_mm)
    x = torch.randn(2, 10, model.hidden_size, requires_grad=True)
    k2(x).sum().backward()
    monkeypatch.undo()
    # 2 active experts: 2 forward + 4 backward matmuls each, none for the 6 idle ones
    assert len(calls) == 12
    for t in (k2.experts.gate_up_proj.grad, k2.experts.down_proj.grad):
        assert t[2:].abs().sum() == 0
        assert t[:2].abs().sum() > 0


def test_dispatch_has_no_per_token_python_loop():
    from k2_moe import experts

    src = inspect.getsource(experts)
    tree = ast.parse(src)
    # every Python loop runs over experts (the split sizes / active experts) or a literal tuple
    per_expert = {"enumerate(self.splits)", "zip(sp, parts, strict=True)", "parts", "d.active"}
    # ...except the CPU's small-batch decode form, a loop over at most SMALL_BATCH_PAIRS
    # token-expert pairs, reached only below that bound (moe.py checks it)
    bounded = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_pairs_on_host"
    )
    exempt = {id(n) for n in ast.walk(bounded)}
    assert "numel() <= SMALL_BATCH_PAIRS" in inspect.getsource(
        importlib.import_module("k2_moe.moe")
    )
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.For | ast.comprehension):
            it = ast.unparse(node.iter)
            assert it in per_expert or isinstance(node.iter, ast.Tuple), it
    assert "parts = zip(" in src and "split(sp)" in src
    # the one host sync: the split sizes, read through host_counts (uniform on meta); the CPU
    # decode form reads its ids on the host, where that is no sync, and only on the CPU
    rest = src.replace(ast.get_source_segment(src, bounded), "")
    assert src.count("host_counts(") == 1 and ".tolist()" not in rest
    assert ".item()" not in src
    assert 'on_host = x.device.type == "cpu"' in src
    # the loops run over experts, never tokens: many tokens, the same number of mm calls
    model, moe = small_configs(experts=4, k=1)
    k2 = _k2_moe(model, moe, kernel="loop")
    k2(torch.randn(1, 4096, model.hidden_size))
    assert len(experts.Dispatch(torch.zeros(4096, 1, dtype=torch.long), 4).active) == 1


def test_bf16_autocast_runs():
    model, moe = small_configs(n_group=4, topk_group=2, experts=16, k=4)
    k2 = _k2_moe(model, moe)
    x = torch.randn(2, 16, model.hidden_size, requires_grad=True)
    with torch.no_grad():
        ref = k2(x)  # fp32; the router stays fp32 under autocast, so the choice is the same
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = k2(x)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert k2.experts.gate_up_proj.grad.dtype == torch.float32
    assert k2.gate.weight.grad is not None


# --- balancing ------------------------------------------------------------------------------


def test_bias_update_from_accumulated_counts():
    model, moe = small_configs(experts=4, k=1, bias_update_speed=0.5)
    k2 = _k2_moe(model, moe)
    with torch.no_grad():
        k2.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    k2.train()
    for _ in range(3):
        k2(torch.randn(2, 6, model.hidden_size))
    stats = k2.load_stats()
    assert stats["counts"].tolist() == [36, 0, 0, 0]
    torch.testing.assert_close(stats["max_over_mean"], torch.tensor(4.0))
    k2.update_router_bias()
    torch.testing.assert_close(k2.gate.e_score_correction_bias, torch.tensor([4.5, 0.5, 0.5, 0.5]))
    assert k2.load_stats()["counts"].sum() == 0
    k2.eval()
    k2(torch.randn(2, 6, model.hidden_size))
    assert k2.load_stats()["counts"].sum() == 0  # eval forwards are not counted
    k2.train()
    k2(torch.randn(2, 6, model.hidden_size))
    bias = k2.gate.e_score_correction_bias.clone()
    k2.reset_counts()  # a skipped step: counts dropped, bias untouched
    assert k2.load_stats()["counts"].sum() == 0
    assert torch.equal(k2.gate.e_score_correction_bias, bias)


def test_balance_loss_hand_computed():
    # 1 sequence, T=2, E=2, k=1: token 0 -> expert 0, token 1 -> expert 0
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3]])
    idx = torch.tensor([[0], [0]])
    # f = E/(kT) * counts = 2/2 * [2, 0] = [2, 0]
    # P = mean([0.75, 0.25], [0.5, 0.5]) = [0.625, 0.375]; L = alpha * 2 * 0.625
    loss = sequence_balance_loss(scores, idx, 1, alpha=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.125))
    # two sequences average
    s2 = torch.cat([scores, torch.tensor([[0.5, 0.5], [0.5, 0.5]])])
    i2 = torch.cat([idx, torch.tensor([[1], [0]])])
    # seq 2: f = [1, 1], P = [0.5, 0.5] -> 1.0 * alpha
    torch.testing.assert_close(
        sequence_balance_loss(s2, i2, 2, alpha=0.1), torch.tensor((0.125 + 0.1) / 2)
    )


def test_balance_loss_on_module():
    model, moe = small_configs(seq_aux_loss_coef=0.01)
    k2 = _k2_moe(model, moe)
    y = k2(torch.randn(2, 8, model.hidden_size))
    assert k2.aux_loss is not None and k2.aux_loss.ndim == 0
    (y.sum() + k2.aux_loss).backward()
    assert k2.gate.weight.grad is not None
    model, moe = small_configs()
    k2 = _k2_moe(model, moe)
    k2(torch.randn(2, 8, model.hidden_size))
    assert k2.aux_loss is None


def test_empty_batch():
    model, moe = small_configs()
    k2 = _k2_moe(model, moe)
    x = torch.randn(0, 4, model.hidden_size, requires_grad=True)
    y = k2(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_gate_up_is_marked_as_two_blocks_for_muon():
    """Muon must orthogonalise gate and up separately (bug: they were treated as one matrix)."""
    from k2_moe.experts import GroupedExperts

    assert GroupedExperts(4, 8, 6).gate_up_proj.muon_split == 2


@pytest.mark.parametrize("n_shared", [0, 1])
def test_small_batch_inference_path_equals_the_dispatch_path(n_shared):
    """Decoding (eval, no grad, <= SMALL_BATCH_PAIRS token-expert pairs) skips the dispatch sort;
    it must give the same output."""
    from k2_moe.experts import SMALL_BATCH_PAIRS

    model, moe = small_configs(n_shared=n_shared)
    k2 = _k2_moe(model, moe).eval()
    k = moe.num_experts_per_tok
    for rows in (1, SMALL_BATCH_PAIRS // k):
        x = torch.randn(rows, 1, model.hidden_size)
        with torch.no_grad():
            fast = k2(x)
        with torch.enable_grad():  # grad mode takes the sorted-dispatch path
            ref = k2(x).detach()
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2])
def test_small_batch_host_loop_equals_the_weight_gather(rows):
    """The two small-batch forms (a loop of matrix-vector products on weight views, used on the
    CPU; the gather of the chosen experts' weights, used on devices) agree."""
    from k2_moe.experts import GroupedExperts, small_batch_forward

    torch.manual_seed(0)
    ex = GroupedExperts(8, 16, 12)
    x = torch.randn(rows, 16)
    idx = torch.stack([torch.randperm(8)[:4] for _ in range(rows)])
    w = torch.rand(rows, 4)
    host = small_batch_forward(x, ex.gate_up_proj, ex.down_proj, idx, w, on_host=True)
    gather = small_batch_forward(x, ex.gate_up_proj, ex.down_proj, idx, w, on_host=False)
    torch.testing.assert_close(host, gather, rtol=1e-5, atol=1e-6)
    assert host.abs().sum() > 0


@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_experts_kernel_announces_what_it_saves(kernel, n_shared):
    """The kernel names its saved activations (k2_core.model.saved): activation policies store
    them by that name, so what it announces must be exactly what autograd then packs."""
    from k2_core.model.saved import ExpertsSaved, listen_saved

    if kernel == "grouped_mm" and not (
        hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    ):
        pytest.skip("no grouped_mm in this torch")
    model, moe = small_configs(n_shared=n_shared)
    k2 = _k2_moe(model, moe, kernel=kernel)
    x = torch.randn(2, 5, model.hidden_size, requires_grad=True)
    announced, packed = [], []
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t),
        listen_saved(announced.append),
    ):
        y = k2(x)
    assert len(announced) == 1 and isinstance(announced[0], ExpertsSaved)
    saved = announced[0]
    n, inter = 10, moe.moe_intermediate_size
    s = n * moe.num_experts_per_tok
    assert saved.h.shape == (s, 2 * inter) and saved.act.shape == (s, inter)
    assert saved.ws.shape == (s, 1)
    if n_shared:
        assert saved.hs.shape == (n, 2 * inter * n_shared) and saved.acts.shape == (
            n,
            inter * n_shared,
        )
    else:
        assert saved.hs is None and saved.acts is None
    keys = {t.untyped_storage().data_ptr() for t in packed}
    for t in saved:
        if t is not None:
            assert t.untyped_storage().data_ptr() in keys
    y.sum().backward()  # the backward reads them back through the same tuple
    assert x.grad is not None
