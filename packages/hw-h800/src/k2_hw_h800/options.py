"""Options of the `h800` backend (the `parallel.options` section when `parallel.backend=h800`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class H800Options(BaseModel):
    """Layout, ZeRO, activation policy and fail-fast settings of the `h800` backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (stages).")
    ep: int = Field(1, ge=1, description="Expert-parallel degree: each rank keeps E/ep experts.")
    dp: int | Literal["auto"] = Field(
        "auto", description="Data-parallel degree; auto = world_size / (pp * ep)."
    )
    virtual_stages: int = Field(
        1, ge=1, description="Model chunks per pipeline rank (interleaved 1F1B)."
    )
    n_microbatches: int = Field(
        0,
        ge=0,
        description="Pipeline micro-batches each train.micro_batch_size batch is cut "
        "into (0: pp); the micro batch size must be a multiple.",
    )
    zero_stage: Literal[0, 1] = Field(
        1, description="0: replicated optimizer state; 1: optimizer state sharded over dp (ZeRO-1)."
    )
    engine: Literal["k2", "deepspeed"] = Field(
        "k2",
        description="ZeRO-1 engine: k2's DistributedMuonClip over torch.distributed, or "
        "deepspeed: a DeepSpeed ZeRO-1 engine holding the partitioned fp32 weights and AdamW "
        "state with K2's MuonClip update and QK-Clip (pp=1, ep=1, zero_stage=1 only).",
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Training-state precision. bf16 (the report's): BF16 weights for "
        "compute, FP32 gradient accumulation buffers, FP32 master weights and optimizer state "
        "ZeRO-sharded beside them (forward/backward under bf16 autocast). fp32: FP32 weights, "
        "gradients and state, as the `single` backend. auto (default): bf16 wherever ZeRO-1 "
        "has dp >= 2 replicas to share the masters over (the report's layouts); fp32 at dp = 1, "
        "where masters would cost 14 bytes a parameter against FP32's 12, and with "
        "engine=deepspeed (its engine holds FP32 weights).",
    )
    activation_policy: dict[str, Any] = Field(
        default_factory=dict,
        description="Switches passed to k2_hw_h800.activations "
        "(e.g. recompute, fp8_storage, cpu_offload); empty: no policy.",
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Collective timeout in seconds: a lost rank fails the job after this.",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo on CPU."
    )
    device: Literal["auto", "cpu", "cuda", "meta"] = Field(
        "auto",
        description="Device of this rank; auto = cuda:LOCAL_RANK when CUDA is available. "
        "meta: tensors without storage, for `k2 plan --dry-run` (its fake process group).",
    )

    @model_validator(mode="after")
    def _deepspeed_is_fp32(self) -> H800Options:
        if self.engine == "deepspeed" and self.dtype == "bf16":
            raise ValueError(
                "parallel.options.dtype: engine=deepspeed holds FP32 weights; set "
                "dtype=fp32 (or auto) or use engine=k2 for bf16"
            )
        return self


def resolve_dtype(options: H800Options, dp: int) -> str:
    """The precision a run uses: `dtype`, with auto resolved for this layout's dp degree."""
    if options.dtype != "auto":
        return options.dtype
    return "bf16" if options.engine == "k2" and dp >= 2 else "fp32"
