"""The small model of the tests that train through a config: the `tiny` preset shrunk to a
width-64 MLA + MoE decoder that trains in about a second a step on one CPU core.

One list instead of a copy per test file: `small_model()` gives the dotted overrides (layers,
widths, experts); a test adds its own train/tracking/checkpoint settings after them.
"""

from __future__ import annotations

# hidden 64, 2 heads of qk 16+8 and v 16, latents 32 (q) / 16 (kv), FFN 128, experts 32 wide
WIDTHS = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_attention_heads=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "moe.moe_intermediate_size=32",
]


def small_model(layers: int | None = 2, experts: int | None = 8, top_k: int = 2) -> list[str]:
    """Overrides of the `tiny` preset for the small model: `layers` decoder layers and `experts`
    routed experts of which `top_k` are chosen (None keeps the preset's, e.g. for experiments
    that set their own)."""
    out = [f"model.num_hidden_layers={layers}"] if layers is not None else []
    out += WIDTHS
    if experts is not None:
        out += [f"moe.n_routed_experts={experts}", f"moe.num_experts_per_tok={top_k}"]
    return out
