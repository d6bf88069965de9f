"""Options of the `packed` dataset: import-light, so plugin registration stays fast."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PackedOptions(BaseModel):
    """Options of the `packed` dataset: a packed zarr store read by a seeded, resumable loader."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str | None = Field(
        None,
        description="fsspec URI of the packed dataset (None: the default `k2 data prepare` "
        "output).",
    )
    split: str = Field("train", min_length=1, description="Split to read (`train` or `val`).")
    batch_size: int = Field(8, gt=0, description="Sequences per batch on each rank.")
    seed: int = Field(0, description="Seed of the per-epoch shuffle.")
    shuffle: bool = Field(True, description="Visit sequences in a seeded permutation per epoch.")
    doc_mask: bool = Field(
        False,
        description="Also return `segment_ids` (document index within the row) for "
        "attention masking.",
    )
    position_ids: bool = Field(
        True, description="With doc_mask, also return `position_ids` restarting at each document."
    )
    prefetch: int = Field(
        4, ge=0, description="Batches prepared ahead by a background thread (0: none)."
    )
    drop_last: bool = Field(
        True,
        description="Drop each epoch's ragged tail (fewer than world_size * batch_size sequences); "
        "else yield it as a short final batch split across ranks.",
    )
    in_memory_max_mb: float = Field(
        0.0,
        ge=0,
        description="Read the whole split into memory at start when its tokens fit in this many "
        "MiB; else (and by default) read each batch's rows and document starts from the store as "
        "byte ranges, so start-up time and memory do not grow with the corpus.",
    )


# --- the store ----------------------------------------------------------------------------------
