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
        "auto", description="Data-parallel degree; auto = world_size / (pp * ep).")
    virtual_stages: int = Field(1, ge=1, description="Model chunks per pipeline rank (interleaved 1F1B).")
    n_microbatches: int = Field(
        0, ge=0, description="Pipeline micro-batches each train.micro_batch_size batch is cut "
        "into (0: pp); the micro batch size must be a multiple.")
    zero_stage: Literal[0, 1] = Field(
        1, description="0: replicated optimizer state; 1: optimizer state sharded over dp (ZeRO-1).")
    engine: Literal["k2", "deepspeed"] = Field(
        "k2", description="ZeRO-1 engine: k2's DistributedMuonClip over torch.distributed, or "
        "deepspeed: a DeepSpeed ZeRO-1 engine holding the partitioned fp32 weights and AdamW "
        "state with K2's MuonClip update and QK-Clip (pp=1, ep=1, zero_stage=1 only).")
    dtype: Literal["bf16", "fp32"] = Field(
        "fp32", description="Training-state precision. bf16 (the report's, default with "
        "engine=k2): BF16 weights for compute, FP32 gradient accumulation buffers, FP32 master "
        "weights and optimizer state ZeRO-sharded beside them (forward/backward under bf16 "
        "autocast). fp32: FP32 weights, gradients and state, as the `single` backend "
        "(the default with engine=deepspeed, whose engine holds FP32 weights).")
    activation_policy: dict[str, Any] = Field(
        default_factory=dict, description="Switches passed to k2_hw_h800.activations "
        "(e.g. recompute, fp8_storage, cpu_offload); empty: no policy.")
    timeout_s: float = Field(
        300.0, gt=0, description="Collective timeout in seconds: a lost rank fails the job after this.")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo on CPU.")
    device: Literal["auto", "cpu", "cuda", "meta"] = Field(
        "auto", description="Device of this rank; auto = cuda:LOCAL_RANK when CUDA is available. "
        "meta: tensors without storage, for `k2 plan --dry-run` (its fake process group).")

    @model_validator(mode="before")
    @classmethod
    def _dtype_follows_engine(cls, data: Any) -> Any:
        """engine=deepspeed defaults to fp32 (DeepSpeed's ZeRO-1 holds FP32 weights)."""
        if isinstance(data, dict) and data.get("engine") == "deepspeed" and "dtype" not in data:
            data = {**data, "dtype": "fp32"}
        return data

    @model_validator(mode="after")
    def _deepspeed_is_fp32(self) -> H800Options:
        if self.engine == "deepspeed" and self.dtype != "fp32":
            raise ValueError("parallel.options.dtype: engine=deepspeed holds FP32 weights; set "
                             "dtype=fp32 or use engine=k2 for bf16")
        return self
