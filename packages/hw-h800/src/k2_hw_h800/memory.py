"""Memory model of a K2 config: parameters per layer, model and optimizer state, activations.

The activation figures follow, tensor by tensor, what this code base's autograd keeps for
the backward (k2_core's MLA / RMSNorm / SwiGLU, k2_moe's experts kernel and router) and what
each policy of `k2_hw_h800.activations` changes, so the planner's numbers can be checked
against `measure_saved_bytes` (bench/bench_planner.py). Bytes, per micro-batch of `tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2_core.config import ModelConfig, MoEConfig
from k2_core.params import attention_params

from .activations import FP8_TILE, ActivationPolicy

F32 = 4
BF16 = 2
I64 = 8


def fp8_bytes(width: int) -> int:
    """Bytes of one row of `width` elements stored as 1x128 FP8 tiles with FP32 scales."""
    tiles = -(-width // FP8_TILE)
    return tiles * (FP8_TILE + F32)


@dataclass(frozen=True)
class SavedSplit:
    """Saved-activation bytes of one layer (or a sum): kept on the GPU and moved to the host."""

    device: float
    host: float = 0.0

    def __add__(self, other: SavedSplit) -> SavedSplit:
        return SavedSplit(self.device + other.device, self.host + other.host)

    def scale(self, k: float) -> SavedSplit:
        """Both parts times k."""
        return SavedSplit(self.device * k, self.host * k)


def _norm_none(w: int, b: int) -> int:
    # fp32 copy of the input + rstd, the normalised value before the weight (for its grad),
    # and the output that the next projection saves
    return F32 * w + F32 + b * w + b * w


def layer_activation_bytes(
    m: ModelConfig,
    moe: MoEConfig,
    layer: int,
    tokens: int,
    policy: ActivationPolicy,
    act_bytes: int = 2,
    param_bytes: int = 2,
) -> SavedSplit:
    """Bytes layer `layer` saves for the backward of one micro-batch of `tokens` tokens.

    `act_bytes` is the compute dtype's width (2 for bf16), `param_bytes` the parameters'
    (the router's fp32 cast of its weight is a saved copy unless parameters are fp32).
    """
    b = act_bytes
    h, nh = m.hidden_size, m.num_attention_heads
    dqk, dv, dr = m.qk_head_dim, m.v_head_dim, m.qk_rope_head_dim
    rq, rkv = m.q_lora_rank, m.kv_lora_rank
    dense = layer < m.first_k_dense_replace
    e, k, inter = moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size
    inter_s = inter * moe.n_shared_experts
    rc, f8, off = policy.recompute, policy.fp8_storage, policy.cpu_offload

    def store(width: int, fp8: bool) -> int:
        return fp8_bytes(width) if (fp8 and f8) else b * width

    dev = host = 0  # per token
    const_dev = const_host = 0  # per layer, independent of tokens

    def keep(nbytes: float, fp8: bool = False, const: bool = False) -> None:
        nonlocal dev, host, const_dev, const_host
        to_host = off and not fp8
        if const:
            const_host, const_dev = (
                (const_host + nbytes, const_dev) if to_host else (const_host, const_dev + nbytes)
            )
        elif to_host:
            host += nbytes
        else:
            dev += nbytes

    # attention: norms, latents, the attention core's q, k, v, output and log-sum-exp, o_proj
    sdpa_core = F32 * nh + b * nh * dqk + b * nh * dv
    if rc:
        keep(b * h)  # the residual entering input_layernorm
        if rq is not None:
            keep(b * rq)  # q_a_proj output (q_a_layernorm input)
        keep(b * (rkv + dr))  # kv_a_proj output (kv_a_layernorm input and the rotary key)
        keep(sdpa_core)
    else:
        keep(_norm_none(h, b))
        if rq is not None:
            keep(_norm_none(rq, b))
        keep(_norm_none(rkv, b))
        keep(3 * b * nh * dqk + sdpa_core)
    # FFN
    keep(b * h if rc else _norm_none(h, b) - (b * h if f8 and not dense else 0))
    if dense:
        i_d = m.intermediate_size
        keep(2 * store(i_d, True), fp8=f8)  # gate and up outputs (SwiGLU inputs)
        if not rc:
            keep(2 * b * i_d)  # silu(gate) and the product
    else:
        if f8 and not rc:
            keep(fp8_bytes(h), fp8=True)  # the experts' input (MoE up-projection input)
        keep(F32 * h + F32 * e + I64 * k + F32 + F32 * k)  # router: fp32 input, scores, top-k
        keep(k * store(2 * inter, True), fp8=f8)  # routed gate/up pre-activations
        keep(k * b)  # routed gate weights
        if not rc:
            keep(k * b * inter)  # routed SwiGLU products (down-projection inputs)
        if inter_s:
            keep(store(2 * inter_s, True), fp8=f8)
            if not rc:
                keep(b * inter_s)
            keep(b * 2 * inter_s * h, const=True)  # the shared gate/up weights, concatenated
        if param_bytes != F32:
            keep(F32 * e * h, const=True)  # the router's fp32 copy of its weight
    return SavedSplit(dev * tokens + const_dev, host * tokens + const_host)


def layer_params(m: ModelConfig, moe: MoEConfig, layer: int) -> tuple[int, int]:
    """(replicated, routed-expert) parameters of decoder layer `layer`."""
    h = m.hidden_size
    rep = attention_params(m) + 2 * h
    if layer < m.first_k_dense_replace:
        return rep + 3 * h * m.intermediate_size, 0
    inter = moe.moe_intermediate_size
    rep += moe.n_routed_experts * h + 3 * h * inter * moe.n_shared_experts
    return rep, 3 * h * inter * moe.n_routed_experts


def layer_adamw_params(m: ModelConfig, moe: MoEConfig, layer: int) -> int:
    """Parameters of layer `layer` on AdamW (router weight, norms), the rest being on Muon."""
    h = m.hidden_size
    norms = 2 * h + m.kv_lora_rank + (m.q_lora_rank or 0)
    router = 0 if layer < m.first_k_dense_replace else moe.n_routed_experts * h
    return norms + router


@dataclass(frozen=True)
class StageState:
    """Model and optimizer state held by one GPU of a pipeline rank, in bytes."""

    params: float
    bf16_params: float
    fp32_grads: float
    optimizer: float
    checkpoint: float = 0.0  # what this GPU writes of a checkpoint (its share, item 5's rule)

    @property
    def model_state(self) -> float:
        """BF16 parameters plus FP32 gradient buffers."""
        return self.bf16_params + self.fp32_grads


def stage_state(
    m: ModelConfig,
    moe: MoEConfig,
    layers: list[int],
    *,
    first: bool,
    last: bool,
    ep: int,
    dp: int,
    master_weights: bool = False,
) -> StageState:
    """State per GPU of a pipeline rank owning `layers` (embedding if `first`, head if `last`),
    routed experts split over `ep`. ZeRO-1 splits the optimizer state of the routed experts
    over their `dp` replicas and that of the other parameters over all `ep x dp` GPUs of the
    stage (the EP group is data parallel for everything but the experts).

    Optimizer state: Muon keeps one FP32 momentum, AdamW two FP32 moments (embedding, head,
    router, norms); with `master_weights` an FP32 copy of every parameter as well.
    """
    h, v = m.hidden_size, m.vocab_size
    n = adamw = experts = 0.0
    for i in layers:
        rep, routed = layer_params(m, moe, i)
        n += rep + routed / ep
        experts += routed / ep
        adamw += layer_adamw_params(m, moe, i)
    if first:
        n += v * h
        adamw += v * h
    if last:
        head = 0 if m.tie_word_embeddings and first else v * h
        n += head + h
        adamw += head + h
    muon = n - adamw
    per_param = F32 * (2 if master_weights else 1)  # Muon momentum (+ master copy)
    opt = per_param * experts / dp + (
        per_param * (muon - experts) + (2 * F32 + (F32 if master_weights else 0)) * adamw
    ) / (dp * ep)
    # a checkpoint's writers: the optimizer state (and masters) by its ZeRO owner, the BF16
    # expert weights spread over their dp replicas, every other weight over the stage's dp x ep
    ckpt = opt + BF16 * experts / dp + BF16 * (n - experts) / (dp * ep)
    return StageState(
        params=n, bf16_params=BF16 * n, fp32_grads=F32 * n, optimizer=opt, checkpoint=ckpt
    )
