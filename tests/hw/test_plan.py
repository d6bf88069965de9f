"""`k2 plan`: the K2 report's layout and memory figures, infeasible requests, the pieces."""

from __future__ import annotations

import json

import pytest
from k2_core.cli import main
from k2_core.configio import load_config
from k2_core.params import count_parameters
from k2_hw_h800.activations import POLICY_LEVELS
from k2_hw_h800.cluster import ClusterSpec, cluster_preset
from k2_hw_h800.memory import layer_params, stage_state
from k2_hw_h800.plan import (
    PlanError,
    PlanOptions,
    human_tokens,
    in_flight_chunks,
    make_plan,
    partition_layers,
)
from pydantic import ValidationError


@pytest.fixture(scope="module")
def k2():
    return load_config("k2-1t", check={"model", "moe"})


@pytest.fixture(scope="module")
def k2_plan(k2):
    return make_plan(k2.model, k2.moe, cluster_preset("h800", 256), model_name="k2-1t").to_dict()


def test_k2_on_256_nodes_is_pp16_ep16_with_the_reports_memory(k2_plan):
    par = k2_plan["parallel"]
    assert (par["pp"], par["ep"], par["dp"]) == (16, 16, 8)
    assert par["model_parallel_group"] == 256
    assert par["virtual_stages"] >= 2
    # about 6 TB of BF16 params + FP32 grads over the 256-GPU model-parallel group
    assert 5.5 <= k2_plan["model_parallel_group_state_tb"]["bf16_params_plus_fp32_grads"] <= 6.5
    g = k2_plan["per_gpu"]
    assert 20.0 <= g["max_model_state_gb"] <= 30.0  # "about 30 GB or less" of model state
    assert g["fp32_grads_gb"] == pytest.approx(2 * g["bf16_params_gb"], rel=1e-3)
    assert g["total_gb"] <= g["usable_hbm_gb"]
    acts = g["activations"]
    assert list(acts) == list(POLICY_LEVELS)
    peaks = [acts[n]["peak_gb"] for n in POLICY_LEVELS]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 2 * peaks[-1]
    assert acts[k2_plan["policy"]]["fits"]
    t = k2_plan["time"]
    bubble = 15 / (par["virtual_stages"] * par["micro_batches"])  # (pp - 1) / (v m)
    assert t["bubble_fraction"] == pytest.approx(bubble, abs=1e-5)
    assert 0.2 < t["mfu"] < 0.7 and t["step_s"] >= t["compute_s"]
    assert t["a2a_network_gb_per_gpu"] > 0


def test_state_totals_match_the_exact_parameter_count(k2, k2_plan):
    total = count_parameters(k2.model, k2.moe)["total"]
    assert k2_plan["params"]["total"] == total
    per_layer = sum(sum(layer_params(k2.model, k2.moe, i)) for i in range(61))
    embed_head_norm = 2 * k2.model.vocab_size * k2.model.hidden_size + k2.model.hidden_size
    assert per_layer + embed_head_norm == total


@pytest.mark.parametrize("nodes", [32, 64, 96, 512])
def test_any_multiple_of_32_nodes_keeps_pp16_ep16(k2, nodes):
    """The report's claim holds for its model state (BF16 params + FP32 grads + moments); FP32
    master weights (the default policy) fit PP16 x EP16 from 64 nodes, where ZeRO-1 has two
    or more replicas to share them: at 32 nodes (dp = 1) each GPU would keep 34 GB of
    optimizer state, so the planner moves to PP32 x EP8."""
    cl = cluster_preset("h800", nodes)
    par = make_plan(k2.model, k2.moe, cl, PlanOptions(master_weights=False)).to_dict()["parallel"]
    assert (par["pp"], par["ep"], par["dp"]) == (16, 16, nodes // 32)
    par = make_plan(k2.model, k2.moe, cl).to_dict()["parallel"]
    assert (par["pp"], par["ep"]) == ((32, 8) if nodes == 32 else (16, 16))


def test_too_few_nodes_is_refused_with_what_does_not_fit(k2):
    with pytest.raises(PlanError) as e:
        make_plan(k2.model, k2.moe, cluster_preset("h800", 16), model_name="k2-1t")
    msg = str(e.value)
    assert "k2-1t on 16 x h800" in msg and "model state" in msg and "GB over" in msg
    assert "\n" not in msg


def test_activations_that_do_not_fit_are_named(k2):
    with pytest.raises(PlanError, match=r"activations \(none\) .* exceed .* by [0-9.]+ GB"):
        make_plan(k2.model, k2.moe, cluster_preset("h800", 256), PlanOptions(policy="none"))


def test_cli_json_and_exit_code(capsys):
    assert main(["plan", "--model", "k2-1t", "--nodes", "256", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parallel"]["pp"] == 16 and d["parallel"]["ep"] == 16
    assert main(["plan", "--model", "k2-1t", "--nodes", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("k2: plan error:")
    assert main(["plan", "--model", "k2-1t", "--nodes", "2", "--cluster", "tpu"]) == 2
    assert "--cluster" in capsys.readouterr().err


def test_cli_text_report(capsys):
    assert main(["plan", "--model", "tiny", "--nodes", "1", "--global-batch-tokens", "64k"]) == 0
    out = capsys.readouterr().out
    assert "parallel: PP" in out and "MFU" in out and "recompute+fp8+offload" in out


def test_partition_balances_layers_and_keeps_edges_light():
    chunks, ranks = partition_layers(61, 16, 2)
    assert len(chunks) == 32 and [i for c in chunks for i in c] == list(range(61))
    sizes = [len(r) for r in ranks]
    assert sum(sizes) == 61 and max(sizes) - min(sizes) <= 1
    assert sizes[0] == sizes[-1] == min(sizes)  # embedding and head ranks get fewer layers
    assert ranks[3] == chunks[3] + chunks[19]  # chunk j lives on rank j % pp
    with pytest.raises(ValueError):
        partition_layers(4, 4, 2)


def test_in_flight_chunks_follow_1f1b():
    assert in_flight_chunks(4, 1, 100, 0) == 4 and in_flight_chunks(4, 1, 100, 3) == 1
    assert in_flight_chunks(4, 1, 2, 0) == 2
    assert in_flight_chunks(16, 2, 128, 0) == 30 + 16 + 1


def test_zero1_shards_expert_state_over_dp_and_the_rest_over_ep_dp(k2):
    a = stage_state(
        k2.model, k2.moe, [5], first=False, last=False, ep=16, dp=1, master_weights=False
    )
    b = stage_state(
        k2.model, k2.moe, [5], first=False, last=False, ep=16, dp=2, master_weights=False
    )
    assert a.params == b.params and b.optimizer == pytest.approx(a.optimizer / 2)
    m = stage_state(
        k2.model, k2.moe, [5], first=False, last=False, ep=16, dp=2, master_weights=True
    )
    assert m.optimizer > b.optimizer


def test_cluster_presets_and_tokens():
    h800 = cluster_preset("h800", 4)
    assert (h800.gpus, h800.hbm_gb, h800.network_gbs_per_gpu) == (32, 80.0, 50.0)
    assert cluster_preset("h200").hbm_gb > cluster_preset("h100").hbm_gb
    with pytest.raises(ValidationError):
        ClusterSpec(nodes=0)
    assert human_tokens("67M") == 2**26 and human_tokens("4096") == 4096
    assert human_tokens("1.5k") == 1500
    with pytest.raises(PlanError):
        human_tokens("lots")
