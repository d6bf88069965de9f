"""Options models of k2_moe's registrations (pydantic only, so `k2 --help` stays light)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RouterOptions(BaseModel):
    """Options of the `sigmoid_noaux_tc` router."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fp32: bool = Field(
        True, description="Compute router logits and scores in fp32, also under autocast."
    )


class MoEOptions(BaseModel):
    """Options of the `moe` FFN."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: Literal["auto", "loop", "grouped_mm"] = Field(
        "auto",
        description="Expert matmuls: `loop` runs each active expert on its rows in cache-sized "
        "tiles with torch.mm into preallocated buffers; `grouped_mm` uses "
        "torch.nn.functional.grouped_mm on full buffers; `auto` picks `loop` on CPU and "
        "`grouped_mm` on CUDA when available.",
    )
