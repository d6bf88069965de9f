"""Logit parity with transformers' DeepseekV3ForCausalLM, both directions, over many small
configs."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from k2_core.errors import CheckpointError  # noqa: E402
from k2_core.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained  # noqa: E402
from k2_core.model import K2ForCausalLM  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

VOCAB, SEQ = 320, 20
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=64,
    rope_interleave=True,
    tie_word_embeddings=False,
)
CASES = {
    "dense": dict(first_k_dense_replace=2),
    "dense3_no_interleave": dict(
        num_hidden_layers=3, first_k_dense_replace=3, rope_interleave=False
    ),
    "dense_q_proj": dict(first_k_dense_replace=2, q_lora_rank=None),
    "dense_yarn": dict(first_k_dense_replace=2, rope=YARN),
    "dense_yarn_0707_no_interleave": dict(
        first_k_dense_replace=2, rope_interleave=False, rope={**YARN, "mscale_all_dim": 0.707}
    ),
    "moe": dict(),
    "moe_no_interleave": dict(rope_interleave=False),
    "moe_groups": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    "moe_shared0": dict(n_shared_experts=0),
    "moe_shared2": dict(n_shared_experts=2, first_k_dense_replace=0),
    "moe_yarn_q_proj": dict(q_lora_rank=None, rope={**YARN, "mscale_all_dim": 0.707}),
    "moe_two_dense_norenorm": dict(
        num_hidden_layers=4, first_k_dense_replace=2, norm_topk_prob=False
    ),
    "kimi_k2": dict(model_type="kimi_k2", n_routed_experts=16, num_experts_per_tok=4, rope=YARN),
    "tied": dict(first_k_dense_replace=2, tie_word_embeddings=True),
}


def _hf_model(case: dict, seed: int = 0) -> DeepseekV3ForCausalLM:
    case = dict(case)
    case.pop("model_type", None)
    rope = case.pop("rope", None)
    kw = {**BASE, **case}
    rp = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    cfg = DeepseekV3Config(**kw, rope_parameters=rp, attn_implementation="eager")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so attention, rope and routing matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.12 if "embed" not in name else 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def _ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def _patch_model_type(path, model_type: str) -> None:
    cfg_file = path / "config.json"
    d = json.loads(cfg_file.read_text())
    d["model_type"] = model_type
    cfg_file.write_text(json.dumps(d))


@pytest.mark.parametrize("name", list(CASES))
def test_hf_to_k2_and_back(name, tmp_path):
    case = CASES[name]
    hf = _hf_model(case)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    hf.save_pretrained(tmp_path / "hf")
    if "model_type" in case:
        _patch_model_type(tmp_path / "hf", case["model_type"])

    k2 = load_pretrained(tmp_path / "hf")
    assert isinstance(k2, K2ForCausalLM)
    with torch.no_grad():
        out = k2(ids).logits
    assert (out - ref).abs().max().item() < 1e-4

    # the recording path (explicit QK^T) agrees too
    k2.set_record_max_logits(True)
    with torch.no_grad():
        rec = k2(ids).logits
    assert (rec - ref).abs().max().item() < 1e-4

    # k2 -> hub layout -> transformers
    save_pretrained(k2, tmp_path / "k2")
    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "k2", attn_implementation="eager").eval()
    with torch.no_grad():
        back = hf2(ids).logits
    assert (back - ref).abs().max().item() < 1e-4


def test_config_roundtrip_and_forms():
    hf_dict = {
        "model_type": "kimi_k2",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "num_nextn_predict_layers": 1,
        "quantization_config": {"quant_method": "fp8"},
        "rope_theta": 50000.0,
        "max_position_embeddings": 512,
        "auto_map": {"AutoConfig": "x"},
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "n_routed_experts": 16,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
    }
    m, e = config_from_hf(hf_dict)
    assert m.q_lora_rank is None and m.rope_theta == 50000.0
    assert m.rope_scaling.factor == 32.0 and m.rope_scaling.beta_fast == 1.0
    assert e.n_routed_experts == 16
    m2, e2 = config_from_hf(config_to_hf(m, e))
    assert (m2, e2) == (m, e)
    # new-style rope_parameters; missing mscale keys mean "off" as in transformers
    new = {
        **hf_dict,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    new.pop("rope_scaling")
    m3, _ = config_from_hf(new)
    assert m3.rope_theta == 1e4 and m3.rope_scaling.mscale_all_dim == 0.0


def test_config_to_hf_loads_in_transformers():
    m, e = config_from_hf(
        {**BASE, "model_type": "deepseek_v3", "rope_scaling": {**YARN, "type": "yarn"}}
    )
    cfg = DeepseekV3Config(**config_to_hf(m, e))
    assert cfg.n_routed_experts == 8 and cfg.rope_parameters["rope_type"] == "yarn"
    assert math.isclose(cfg.rope_parameters["factor"], 4.0)


def _fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    scale = torch.empty(rows, cols)
    q = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = blk / s
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_block_quantized_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    # 200 x 160 style shapes exercise partial 128-blocks
    case = dict(
        hidden_size=160, intermediate_size=200, moe_intermediate_size=136, first_k_dense_replace=1
    )
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "bf")
    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    quant: dict[str, torch.Tensor] = {}
    n_fp8 = 0
    for k, v in sd.items():
        if (
            v.ndim == 2
            and "embed" not in k
            and "lm_head" not in k
            and "gate.weight" not in k.replace("gate_proj", "")
        ):
            q, s = _fp8_quantize(v.float())
            quant[k] = q
            quant[k + "_scale_inv"] = s
            sd[k] = (
                q.float()
                * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: v.shape[0], : v.shape[1]]
            )
            n_fp8 += 1
        else:
            quant[k] = v
    assert n_fp8 > 10
    # an MTP layer (model.layers.{num_hidden_layers}) and a rotary buffer are ignored on load
    quant["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(4, 4)
    quant["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    (tmp_path / "fp8").mkdir()
    save_file(quant, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())

    (tmp_path / "deq").mkdir()  # the dequantised reference, loaded by transformers
    save_file(sd, str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())
    ref_model = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "deq", attn_implementation="eager"
    ).eval()
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = load_pretrained(tmp_path / "fp8")(ids).logits
    assert (out - ref).abs().max().item() < 1e-4


def test_sharded_index_and_stacked_keys(tmp_path):
    hf = _hf_model(dict(num_hidden_layers=3))
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    hf.save_pretrained(tmp_path / "hf")
    k2 = load_pretrained(tmp_path / "hf")
    files = save_pretrained(k2, tmp_path / "sharded", max_shard_bytes=40_000)
    assert len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    with torch.no_grad():
        assert (load_pretrained(tmp_path / "sharded")(ids).logits - ref).abs().max().item() < 1e-4
    hf2 = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "sharded", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert (hf2(ids).logits - ref).abs().max().item() < 1e-4

    # already-stacked expert tensors (k2's own layout) load as well
    from safetensors.torch import save_file

    (tmp_path / "stacked").mkdir()
    sd = {
        k: v.contiguous()
        for k, v in k2.state_dict().items()
        if "rotary" not in k and "expert_counts" not in k
    }
    save_file(sd, str(tmp_path / "stacked" / "model.safetensors"))
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    with torch.no_grad():
        assert (load_pretrained(tmp_path / "stacked")(ids).logits - ref).abs().max().item() < 1e-4


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model(dict(first_k_dense_replace=2))
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    cfg = (tmp_path / "hf" / "config.json").read_text()

    bad = dict(sd)
    del bad["model.layers.1.self_attn.kv_b_proj.weight"]
    (tmp_path / "missing").mkdir()
    save_file(bad, str(tmp_path / "missing" / "model.safetensors"))
    (tmp_path / "missing" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_pretrained(tmp_path / "missing")

    extra = {**sd, "model.layers.0.self_attn.surprise.weight": torch.zeros(2, 2)}
    (tmp_path / "extra").mkdir()
    save_file(extra, str(tmp_path / "extra" / "model.safetensors"))
    (tmp_path / "extra" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"surprise\.weight in model\.safetensors"):
        load_pretrained(tmp_path / "extra")
