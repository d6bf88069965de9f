"""Multi-head Latent Attention (MLA), parameter for parameter as HF `DeepseekV3Attention`.

Attention always runs through `F.scaled_dot_product_attention` (causal, or a boolean mask
for packed segments). With `record_max_logits = True` a no-grad q @ k^T also yields each
head's max pre-softmax logit over visible pairs, kept on device in `max_logits` [heads]
(fp32, a running max until reset) for QK-Clip. Nothing syncs with the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .kvcache import KVCache
from .layers import RMSNorm
from .rope import apply_rotary, softmax_scale


class MLALatents(NamedTuple):
    """What MLA's down-projections make of x: `q` the query latent [B, T, q_lora_rank] (x itself
    without q_lora), `kv` the normed KV latent [B, T, kv_lora_rank], `k_rot` the unrotated
    shared rotary key [B, T, rope]."""

    q: torch.Tensor
    kv: torch.Tensor
    k_rot: torch.Tensor


class MLA(nn.Module):
    """MLA with low-rank queries (or a direct q_proj), a compressed KV latent and a shared
    rotary key."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.rope_interleave = cfg.rope_interleave
        self.softmax_scale = softmax_scale(cfg)
        h, bias = cfg.hidden_size, cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(
                self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False
            )
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank,
            self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=bias)
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, H]; cos/sin [B|1, T, rope/2]; attn_mask: bool [B, 1, T, T] (True = visible)
        or None for plain causal attention. Returns [B, T, H].

        With a `cache` (its `begin` already called for this forward) the compressed latent and
        rotary key are stored; an empty cache (prefill) attends as without one, a filled one
        attends from the new tokens to every cached token with kv_b_proj absorbed."""
        if cache is not None and not cache.is_empty():
            return self._forward_cached(x, cos, sin, cache)
        latents = self.compress(x)
        q, k, v = self.expand(*latents, cos, sin)
        if cache is not None:  # the latent and the rotated shared key (head 0's rope columns)
            cache.write(
                self.layer_idx, torch.cat((latents.kv, k[:, 0, :, self.qk_nope_head_dim :]), dim=-1)
            )
        return self.attend(q, k, v, attn_mask)

    # The three steps of a forward without a filled cache. They are the seams an activation
    # policy wraps from outside (k2_hw_h800.activations runs `expand` as a recompute region):
    # change what a step computes here, not by copying `forward` elsewhere.

    def compress(self, x: torch.Tensor) -> MLALatents:
        """The down-projections: x [B, T, H] -> the query and KV latents and the unrotated
        rotary key."""
        cq = x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        return MLALatents(cq, self.kv_a_layernorm(kv_nope), k_rot)

    def expand(
        self,
        cq: torch.Tensor,
        ckv: torch.Tensor,
        k_rot: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The up-projections through RoPE: latents -> q, k, v [B, heads, T, qk_head_dim]
        (SDPA's inputs).

        v comes zero-padded to q's width: SDPA's fused (flash) kernels need one head width for
        q, k and v, MLA's values are narrower (128 vs 192 in K2), and zero columns change
        nothing but the width; `attend` slices them off.
        """
        bsz, seq = cq.shape[:2]
        nh = self.num_heads
        q = self.q_proj(cq) if self.q_lora_rank is None else self.q_b_proj(cq)
        q = q.view(bsz, seq, nh, self.qk_head_dim)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(ckv).view(bsz, seq, nh, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q_rot = apply_rotary(q_rot, cos.unsqueeze(2), sin.unsqueeze(2), self.rope_interleave)
        k_rot = apply_rotary(
            k_rot, cos, sin, self.rope_interleave
        )  # [B, T, rope], one for all heads

        # [B, heads, T, D] views; the shared rotary key is broadcast, copied once by the cat.
        q = torch.cat((q_nope, q_rot), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_rot.unsqueeze(2).expand(-1, -1, nh, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        pad = self.qk_head_dim - self.v_head_dim
        return q, k, (F.pad(v, (0, pad)) if pad > 0 else v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over `expand`'s q, k, padded v (recording max logits if asked), then
        o_proj -> [B, T, H]."""
        bsz, _, seq, _ = q.shape
        if self.record_max_logits:
            self._record_max_logits(q, k, attn_mask)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=self.softmax_scale
            )
        if out.shape[-1] != self.v_head_dim:
            out = out[..., : self.v_head_dim]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.v_head_dim)
        return self.o_proj(out)

    def _forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """New tokens attend to the cache in latent space (DeepSeek-V3's weight absorption).

        q_nope . (W_UK c) = (W_UK^T q_nope) . c and sum_j p_j W_UV c_j = W_UV (sum_j p_j c_j), so
        the per-head keys and values of the prefix are never materialised: attention runs in the
        latent space with one key/value row per cached token, like multi-query attention.
        """
        bsz, seq, _ = x.shape
        nh, dn, dl = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(bsz, seq, nh, self.qk_head_dim).split(
            [dn, self.qk_rope_head_dim], dim=-1
        )
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([dl, self.qk_rope_head_dim], dim=-1)
        # one rotation for the query heads and the shared key (as head nh): fewer small ops
        rot = apply_rotary(
            torch.cat((q_rot, k_rot.unsqueeze(2)), dim=2),
            cos.unsqueeze(2),
            sin.unsqueeze(2),
            self.rope_interleave,
        )
        q_rot, k_rot = rot[:, :, :nh], rot[:, :, nh]
        keys = cache.write(self.layer_idx, torch.cat((self.kv_a_layernorm(kv_nope), k_rot), dim=-1))

        w = self.kv_b_proj.weight.view(nh, dn + self.v_head_dim, dl)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, nope, latent], [h, v, latent]
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk).transpose(1, 2)  # [B, T, h, latent]
        qc = torch.cat((q_lat, q_rot), dim=-1)  # [B, T, h, latent+rope]: T as SDPA's head axis
        keys = keys.unsqueeze(1)  # [B, 1, S, latent+rope], shared by every head and query
        if seq > 1:
            keys = keys.expand(-1, seq, -1, -1)
        # the new tokens' heads are SDPA's query rows; row t sees slots <= its own position
        # (no mask: a one-token step of equal-length rows sees every slot)
        mask = None if cache.visible is None else cache.visible[:, :, None, :]
        out_lat = F.scaled_dot_product_attention(
            qc, keys, keys[..., :dl], attn_mask=mask, scale=self.softmax_scale
        )
        out = torch.matmul(out_lat.transpose(1, 2), w_uv.transpose(1, 2))  # [B, h, T, v]
        out = out.transpose(1, 2).reshape(bsz, seq, nh * self.v_head_dim)
        return self.o_proj(out)

    @torch.no_grad()
    def _record_max_logits(
        self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> None:
        """Each head's max pre-softmax logit over visible pairs, as a running max on device.

        A separate no-grad QK^T (one forward matmul, nothing kept for backward) is cheaper
        than leaving the fused attention kernel for an explicit softmax path.
        """
        seq = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, h, T, T]
        if attn_mask is None:
            attn_mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril_()
        step_max = scores.masked_fill_(~attn_mask, float("-inf")).amax(dim=(0, 2, 3)).float()
        step_max *= self.softmax_scale
        # Running max until the owner resets it: micro-batches of one step all count.
        self.max_logits = (
            step_max if self.max_logits is None else torch.maximum(self.max_logits, step_max)
        )


def build_mla(model: ModelConfig, layer_idx: int, *, options: Any = None) -> MLA:
    """Multi-head Latent Attention (DeepSeek-V3 / Kimi K2)."""
    return MLA(model, layer_idx)
