"""`k2 import-hf` and `k2 export-hf` as a user runs them, transformers on both ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

K2 = str(Path(sys.executable).parent / "k2")


def test_import_then_export_round_trip(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, max_position_embeddings=256,
    )
    hf = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = hf(ids).logits

    run = lambda *a: subprocess.run([K2, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    imp = run("import-hf", str(tmp_path / "src"), str(tmp_path / "k2ck"))
    assert imp.returncode == 0, imp.stderr
    assert "imported" in imp.stdout
    exp = run("export-hf", str(tmp_path / "k2ck"), str(tmp_path / "out"))
    assert exp.returncode == 0, exp.stderr
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = back(ids).logits
    assert (got - want).abs().max() < 1e-4

    missing = run("import-hf", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_export_of_a_training_checkpoint(tmp_path):
    """What `k2 pretrain` writes (runs/NAME/checkpoints/step_N) exports like a saved model:
    one loader for every command that takes a checkpoint."""
    from k2_core.configio import load_config
    from k2_core.model import build_model
    from k2_core.trainstate import list_checkpoints, save_train_state
    from transformers import DeepseekV3ForCausalLM

    cfg = load_config("tiny", ["model.num_hidden_layers=2", "model.hidden_size=64",
                               "model.num_attention_heads=2", "model.q_lora_rank=32",
                               "model.kv_lora_rank=16", "moe.n_routed_experts=4",
                               "moe.num_experts_per_tok=2", "tracking.tracker=null"])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    root = str(tmp_path / "run" / "checkpoints")
    save_train_state(root, 3, model=model, optimizer=opt,
                     attrs={"run_config": cfg.model_dump(mode="json")})
    ckpt = list_checkpoints(root)[-1][1]
    exp = subprocess.run([K2, "export-hf", ckpt, str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300)
    assert exp.returncode == 0, exp.stderr
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits, rtol=1e-4,
                                   atol=1e-4)
    bad = subprocess.run([K2, "export-hf", str(tmp_path / "run"), str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
