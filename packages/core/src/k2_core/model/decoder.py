"""The K2 decoder: embeddings, MLA + FFN blocks (dense first, then MoE from the `ffn` slot), head.

Parameter names follow HF `DeepseekV3ForCausalLM` so state dicts map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, RunConfig
from ..registry import Registry
from .init import init_parameters, materialize
from .kvcache import KVCache
from .layers import RMSNorm
from .losses import linear_cross_entropy
from .protocols import LoadBalanced
from .rope import RotaryEmbedding

_BUILTIN = {("attention", "mla"): "attention", ("ffn", "swiglu"): "ffn"}


@dataclass
class CausalLMOutput:
    """logits [B, T, V]; loss = mean CE over labels != -100 (+ aux_loss), or None; aux_loss or
    None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _build_attention(cfg: ModelConfig, layer_idx: int, registry: Registry) -> nn.Module:
    return registry.build("attention", cfg.attention, cfg, layer_idx, where="model.attention")


def _build_ffn(cfg: ModelConfig, moe: MoEConfig, layer_idx: int, registry: Registry) -> nn.Module:
    dense = layer_idx < cfg.first_k_dense_replace
    name, where = (cfg.dense_ffn, "model.dense_ffn") if dense else (moe.ffn, "moe.ffn")
    return registry.build("ffn", name, cfg, moe, layer_idx, registry=registry, where=where)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(
        self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int, registry: Registry | None = None
    ):
        super().__init__()
        self.self_attn = _build_attention(cfg, layer_idx, registry)
        self.mlp = _build_ffn(cfg, moe, layer_idx, registry)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]."""
        if cache is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        else:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    """The stack without the head (HF `DeepseekV3Model`)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, registry: Registry | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, moe, i, registry) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        new_lengths: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, H].

        With a `cache`, the tokens continue each row's cached sequence (positions follow from
        the cache); `new_lengths` [B] says how many of the T are real per row (right padding,
        only on an empty cache), default all T.
        """
        if cache is not None:
            return self._forward_cached(input_ids, cache, new_lengths)
        x = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        attn_mask = None
        if segment_ids is not None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril_()
            attn_mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal  # [B, T, T]
            attn_mask = attn_mask.unsqueeze(1)
        elif any(getattr(layer.self_attn, "record_max_logits", False) for layer in self.layers):
            # the recording path needs an explicit mask: build it once, not per layer
            attn_mask = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril_()
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        return self.norm(x)

    def _forward_cached(
        self, input_ids: torch.Tensor, cache: KVCache, new_lengths: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The stack over new tokens that continue the cache (see `forward`)."""
        seq = input_ids.shape[1]
        if new_lengths is not None and not cache.is_empty():
            raise ValueError("new_lengths (right padding) is only allowed on an empty cache")
        x = self.embed_tokens(input_ids)
        cache.begin(seq)
        cos, sin = cache.rotary(self.rotary_emb, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, None, cache)
        cache.commit(seq if new_lengths is None else new_lengths, seq)
        return self.norm(x)


class K2ForCausalLM(nn.Module):
    """The K2 language model (HF `DeepseekV3ForCausalLM` layout)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        moe_cfg: MoEConfig | None = None,
        registry: Registry | None = None,
        *,
        init_weights: bool = True,
    ):
        super().__init__()
        moe_cfg = moe_cfg if moe_cfg is not None else MoEConfig()
        self.config = model_cfg
        self.moe_config = moe_cfg
        if registry is None:
            from ..plugins import get_registry

            registry = get_registry()
        self.model = K2Model(model_cfg, moe_cfg, registry)
        self.lm_head = nn.Linear(model_cfg.hidden_size, model_cfg.vocab_size, bias=False)
        if model_cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init_weights:
            self.init_weights()

    # --- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """normal(0, initializer_range) for matrices/embeddings/expert tensors, ones for norms,
        zeros for biases and buffers (RoPE recomputed), each tensor from a generator seeded by
        (seed, its name[, expert]): the same values under any layout (`model.init`)."""
        init_parameters(self, seed, self.config.initializer_range)

    def tie_weights(self) -> None:
        """Point the head at the embedding when the config ties them (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        cache: KVCache | None = None,
        new_lengths: torch.Tensor | int | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] already shifted (-100 ignored).

        With labels and `return_logits=False` (training) the head and the loss are fused:
        `logits` is None and no [B, T, vocab] tensor is kept for the backward. With a `cache`
        (inference) the tokens continue the cached sequences; see `K2Model.forward`.
        """
        if cache is not None:
            if position_ids is not None or segment_ids is not None:
                raise ValueError("with a cache, positions come from the cache; no segment_ids")
            hidden = self.model(input_ids, cache=cache, new_lengths=new_lengths)
        else:
            hidden = self.model(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        fused = labels is not None and not return_logits
        logits = None if fused else self.lm_head(hidden)
        aux = None
        for m in self.moe_layers():
            a = getattr(m, "aux_loss", None)
            if a is not None:
                aux = a if aux is None else aux + a
        loss = None
        if fused:
            loss = linear_cross_entropy(hidden, self.lm_head.weight, labels)
        elif labels is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
            )
        if loss is not None and aux is not None:  # the balance loss trains on either path
            loss = loss + aux
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux)

    # --- attention logits (QK-Clip) ------------------------------------------------------
    def attention_layers(self) -> list[nn.Module]:
        """Each layer's attention module, in order."""
        return [layer.self_attn for layer in self.model.layers]

    def set_record_max_logits(self, enabled: bool = True) -> None:
        """Record each head's max pre-softmax logit in the following forwards (`max_logits`)."""
        for attn in self.attention_layers():
            attn.record_max_logits = enabled
            if not enabled:
                attn.max_logits = None

    def reset_max_logits(self) -> None:
        """Forget recorded max logits; forwards until the next reset take the running max
        (so one optimizer step's micro-batches all count)."""
        for attn in self.attention_layers():
            attn.max_logits = None

    def max_logits(self) -> torch.Tensor:
        """[layers, heads] fp32 max pre-softmax logits since the last reset."""
        rows = []
        for i, attn in enumerate(self.attention_layers()):
            if getattr(attn, "max_logits", None) is None:
                raise RuntimeError(
                    f"layer {i}: no max logits recorded; "
                    "call set_record_max_logits(True) and run a forward"
                )
            rows.append(attn.max_logits)
        return torch.stack(rows)

    # --- MoE -----------------------------------------------------------------------------
    def moe_layers(self) -> list[nn.Module]:
        """The FFN modules with routed experts (those satisfying `LoadBalanced`)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, LoadBalanced)]

    def update_router_bias(self) -> None:
        """Apply the aux-loss-free bias update in every MoE layer (once per optimizer step)."""
        for m in self.moe_layers():
            m.update_router_bias()

    def reset_router_counts(self) -> None:
        """Discard this step's expert counts without a bias update (a skipped step)."""
        for m in self.moe_layers():
            m.reset_counts()

    def load_stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per MoE layer held here (by layer index): that layer's `load_stats()`; layers of
        another pipeline stage (still on the meta device) are left out."""
        return {
            i: layer.mlp.load_stats()
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, LoadBalanced)
            and not any(b.is_meta for b in layer.mlp.buffers())
        }

    def num_parameters(self) -> int:
        """Total parameters (tied weights counted once; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty compressed KV cache for `batch_size` rows of up to `capacity` tokens."""
        ref = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity, dtype=ref.dtype, device=ref.device)


def build_model(
    cfg: RunConfig | tuple[ModelConfig, MoEConfig],
    registry: Registry | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> K2ForCausalLM:
    """Build a K2ForCausalLM: on "meta" uninitialised (a backend materialises its share),
    elsewhere (default cpu) materialised and initialised from `seed` (default: the run's
    `train.seed`, or 0) layout-free, as any backend would initialise the same parameters."""
    if isinstance(cfg, RunConfig):
        model_cfg, moe_cfg = cfg.model, cfg.moe
        seed = cfg.train.seed if seed is None else seed
    else:
        model_cfg, moe_cfg = cfg
    with torch.device("meta"):
        model = K2ForCausalLM(model_cfg, moe_cfg, registry=registry, init_weights=False)
    device = torch.device(device if device is not None else "cpu")
    if device.type != "meta":
        materialize(model, device)
        model.tie_weights()
        model.init_weights(seed or 0)
    if dtype is not None:
        model = model.to(dtype)
    return model
