"""The run configuration: frozen pydantic models, one section per concern.

Model and MoE fields keep the Hugging Face `DeepseekV3Config` names so a checkpoint's
config.json maps onto them one to one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = _FROZEN


class RopeScaling(Section):
    """YaRN rope scaling as DeepSeek-V3 / Kimi K2 use it."""

    type: Literal["yarn"] = Field("yarn", description="Scaling method; only YaRN is supported.")
    factor: float = Field(..., gt=1.0, description="Context extension factor (K2: 32).")
    original_max_position_embeddings: int = Field(
        ..., gt=0, description="Context length the rotary frequencies were trained for (K2: 4096)."
    )
    beta_fast: float = Field(32.0, gt=0, description="YaRN ramp boundary for extrapolation.")
    beta_slow: float = Field(1.0, gt=0, description="YaRN ramp boundary for interpolation.")
    mscale: float = Field(1.0, description="YaRN attention-temperature coefficient (numerator).")
    mscale_all_dim: float = Field(
        1.0, description="YaRN coefficient also applied to the softmax scale (squared), as in MLA."
    )


class ModelConfig(Section):
    """The decoder: MLA attention, dense SwiGLU layers first, then MoE layers."""

    vocab_size: int = Field(
        163840, gt=0, description="Vocabulary size (embedding and LM head rows)."
    )
    hidden_size: int = Field(7168, gt=0, description="Residual stream width.")
    intermediate_size: int = Field(18432, gt=0, description="SwiGLU width of the dense layers.")
    num_hidden_layers: int = Field(61, gt=0, description="Number of decoder layers.")
    first_k_dense_replace: int = Field(
        1, ge=0, description="The first k layers use a dense FFN; the rest use the MoE FFN."
    )
    num_attention_heads: int = Field(64, gt=0, description="Attention heads.")
    num_key_value_heads: int | None = Field(
        None, description="Kept for HF compatibility; MLA has one latent per token (None = heads)."
    )
    q_lora_rank: int | None = Field(
        1536, description="Rank of the low-rank query projection; None projects queries directly."
    )
    kv_lora_rank: int = Field(512, gt=0, description="Rank of the compressed key-value latent.")
    qk_nope_head_dim: int = Field(128, gt=0, description="Per-head query/key width without rotary.")
    qk_rope_head_dim: int = Field(
        64, gt=0, description="Rotary width; the rotary key is shared by all heads."
    )
    v_head_dim: int = Field(128, gt=0, description="Per-head value width.")
    hidden_act: Literal["silu"] = Field("silu", description="FFN activation (SwiGLU gate).")
    max_position_embeddings: int = Field(131072, gt=0, description="Longest supported context.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    rope_theta: float = Field(50000.0, gt=0, description="Rotary base frequency.")
    rope_scaling: RopeScaling | None = Field(
        None, description="YaRN scaling, or None for plain RoPE."
    )
    rope_interleave: bool = Field(
        True, description="Rotary pairs are interleaved (x0,x1),(x2,x3) as in DeepSeek's weights."
    )
    attention_bias: bool = Field(
        False, description="Biases on the attention input/output projections."
    )
    tie_word_embeddings: bool = Field(
        False, description="Tie LM head to the embedding (K2: untied)."
    )
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight init.")
    attention: str = Field("mla", description="`attention` slot implementation.")
    dense_ffn: str = Field("swiglu", description="`ffn` slot implementation for the dense layers.")

    @field_validator("num_key_value_heads")
    @classmethod
    def _kv_heads_divide(cls, v: int | None, info: ValidationInfo) -> int | None:
        heads = info.data.get("num_attention_heads")
        if v is not None and heads is not None and (v <= 0 or heads % v):
            raise ValueError(f"must divide num_attention_heads ({heads}), got {v}")
        return v

    @field_validator("q_lora_rank")
    @classmethod
    def _positive_rank(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be > 0 or null, got {v}")
        return v

    @field_validator("qk_rope_head_dim")
    @classmethod
    def _even_rope(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"must be even (rotary pairs), got {v}")
        return v

    @field_validator("first_k_dense_replace")
    @classmethod
    def _dense_le_layers(cls, v: int, info: ValidationInfo) -> int:
        layers = info.data.get("num_hidden_layers")
        if layers is not None and v > layers:
            raise ValueError(f"must be <= num_hidden_layers ({layers}), got {v}")
        return v

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head (non-rotary + rotary)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MoEConfig(Section):
    """Routed experts: sigmoid scores, selection-only bias, group-limited top-k."""

    ffn: str = Field("moe", description="`ffn` slot implementation for the MoE layers.")
    router: str = Field("sigmoid_noaux_tc", description="`router` slot implementation.")
    router_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the chosen router, checked against its model."
    )
    moe_intermediate_size: int = Field(2048, gt=0, description="SwiGLU width of each expert.")
    n_routed_experts: int = Field(384, gt=0, description="Routed experts per MoE layer.")
    num_experts_per_tok: int = Field(8, gt=0, description="Experts chosen per token (top-k).")
    n_shared_experts: int = Field(1, ge=0, description="Always-on shared experts per MoE layer.")
    n_group: int = Field(1, gt=0, description="Expert groups for group-limited routing.")
    topk_group: int = Field(1, gt=0, description="Groups a token may route into.")
    norm_topk_prob: bool = Field(
        True, description="Renormalise the chosen gate weights to sum to 1."
    )
    routed_scaling_factor: float = Field(2.827, gt=0, description="Scale on the routed output.")
    scoring_func: Literal["sigmoid", "softmax"] = Field(
        "sigmoid", description="Router score function."
    )
    topk_method: Literal["noaux_tc", "greedy"] = Field(
        "noaux_tc",
        description="noaux_tc: bias-corrected, group-limited selection; greedy: plain top-k.",
    )
    bias_update_speed: float = Field(
        1e-3, ge=0, description="u in bias += u * sign(mean_load - load), once per optimizer step."
    )
    seq_aux_loss_coef: float = Field(
        0.0, ge=0, description="Weight of the sequence-wise balance loss (0 disables it)."
    )

    @field_validator("num_experts_per_tok")
    @classmethod
    def _k_le_experts(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("n_routed_experts")
        if n is not None and v > n:
            raise ValueError(f"must be <= n_routed_experts ({n}), got {v}")
        return v

    @field_validator("n_group")
    @classmethod
    def _groups_divide(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("n_routed_experts")
        if n is not None and n % v:
            raise ValueError(f"must divide n_routed_experts ({n}), got {v}")
        return v

    @field_validator("topk_group")
    @classmethod
    def _topk_group_le_groups(cls, v: int, info: ValidationInfo) -> int:
        g = info.data.get("n_group")
        if g is not None and v > g:
            raise ValueError(f"must be <= n_group ({g}), got {v}")
        n, k = info.data.get("n_routed_experts"), info.data.get("num_experts_per_tok")
        if g and n and k and k > v * (n // g):
            raise ValueError(
                f"topk_group x experts per group ({v} x {n // g}) must be >= "
                f"num_experts_per_tok ({k})"
            )
        return v


class OptimConfig(Section):
    """The optimizer and its learning-rate schedule."""

    name: str = Field("muonclip", description="`optimizer` slot implementation.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the chosen optimizer, checked against its model.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay.")
    schedule: str = Field("wsd", description="`lr_schedule` slot implementation.")
    schedule_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the chosen schedule, checked against its model.",
    )


class DataConfig(Section):
    """Where training batches come from."""

    dataset: str = Field("packed", description="`dataset` slot implementation.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the chosen dataset (e.g. its uri; none: the built-in corpus).",
    )
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence.")


class TrainConfig(Section):
    """The loop: batch, steps, precision, clipping."""

    steps: int = Field(200, gt=0, description="Optimizer steps.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 disables it).")
    bf16: bool = Field(False, description="Run forward/backward under bf16 autocast.")
    compile: bool = Field(
        False,
        description="Regional torch.compile of each decoder block (attention, dense FFN, "
        "router; the routed experts stay eager), applied after the backend builds the model "
        "(k2_core.compile). Not with an activation policy.",
    )
    seed: int = Field(0, description="Seed for weights, data order and sampling.")
    log_every: int = Field(10, gt=0, description="Steps between logged metrics.")
    eval_every: int = Field(
        50, ge=0, description="Steps between validation-loss evaluations (0: never)."
    )
    eval_batches: int = Field(4, gt=0, description="Validation batches per evaluation.")
    max_bad_steps: int = Field(
        5, gt=0, description="Consecutive non-finite steps (skipped) before the run stops."
    )


class ParallelConfig(Section):
    """How the job is spread over processes."""

    backend: str = Field("single", description="`backend` slot implementation.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the chosen backend."
    )
    memory_check: bool = Field(
        True,
        description="Refuse, before allocating, a run whose weights, gradients and "
        "optimizer state (the backend's per-process share, summed over this host's processes "
        "on the CPU) exceed this machine's memory; false: go ahead anyway.",
    )


class TrackingConfig(Section):
    """Experiment tracking."""

    tracker: str | None = Field(
        "mlflow", description="`tracker` slot implementation (null: no tracking)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the chosen tracker."
    )
    experiment: str = Field("k2", description="Experiment name.")
    tracking_uri: str | None = Field(
        None,
        description="Tracking URI (null: MLFLOW_TRACKING_URI, else a local store in the "
        "run folder).",
    )


class CheckpointConfig(Section):
    """Where and how often to checkpoint."""

    dir: str = Field("runs/latest", description="fsspec URI of the run folder.")
    every: int = Field(100, gt=0, description="Steps between checkpoints.")
    keep: int = Field(2, gt=0, description="Checkpoints kept (older ones are deleted).")
    resume: str = Field(
        "auto",
        description="auto: newest complete checkpoint in the run folder; never; or a "
        "checkpoint URI.",
    )


class RunConfig(Section):
    """A whole run: every section, plus validated sections that plugins contribute."""

    name: str = Field("run", description="Run name.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The decoder.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="The MoE layers.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="The optimizer.")
    data: DataConfig = Field(default_factory=DataConfig, description="The training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallelism.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Tracking.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints."
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Sections owned by plugins, keyed by section name; each is checked against "
        "the model its plugin registered.",
    )
