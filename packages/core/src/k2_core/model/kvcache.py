"""MLA's compressed KV cache for incremental decoding.

Per layer it keeps what MLA compresses a token into, not the per-head keys and values: the
normed kv latent (kv_lora_rank) and the rotated rotary key shared by all heads (rope dim), side
by side in one [B, capacity, kv_lora_rank + rope] tensor so decode attends to it with a single
matmul (the up-projection is absorbed into the query). Rows are ragged: row b holds
`lengths[b]` tokens at slots 0..lengths[b]-1; new tokens are written at slot lengths[b] on.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    """Compressed per-layer caches plus each row's length; rows can be dropped (`select`)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.capacity = capacity
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.layers = [
            torch.zeros(batch_size, capacity, width, dtype=dtype, device=device)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Host-side upper bound of max(lengths): decode attends to slots [0, max_length) only,
        # without a device->host sync per step.
        self.max_length = 0
        # Set by the model for the forward in progress (see `begin`).
        self.write_index: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return self.lengths.shape[0]

    def is_empty(self) -> bool:
        """True before the first forward (prefill may use the uncached attention path)."""
        return self.max_length == 0

    def begin(self, n_new: int) -> torch.Tensor:
        """Prepare a forward of `n_new` tokens per row; returns their positions [B, n_new]."""
        if self.max_length + n_new > self.capacity:
            raise ValueError(f"KV cache full: {self.max_length} + {n_new} > capacity {self.capacity}")
        self._rows = torch.arange(self.batch_size, device=self.lengths.device)[:, None]
        steps = torch.arange(n_new, device=self.lengths.device)
        self.write_index = self.lengths[:, None] + steps  # [B, T]
        end = self.max_length + n_new
        slots = torch.arange(end, device=self.lengths.device)
        # query t of row b sees slots 0..lengths[b]+t (its own token included)
        self.visible = slots[None, None, :] <= self.write_index[:, :, None]  # [B, T, end]
        return self.write_index

    def write(self, layer: int, entries: torch.Tensor) -> torch.Tensor:
        """Store entries [B, T, kv_lora+rope] at this forward's slots; returns the used prefix."""
        cache = self.layers[layer]
        cache[self._rows, self.write_index] = entries.to(cache.dtype)
        return cache[:, : self.max_length + entries.shape[1]]

    def commit(self, n_valid: torch.Tensor | int, n_new: int) -> None:
        """After a forward of `n_new` tokens: each row keeps `n_valid` of them (right padding)."""
        self.lengths = self.lengths + n_valid
        self.max_length += n_new
        self.write_index = None
        self.visible = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a 1-D index), e.g. after some sequences finished."""
        self.layers = [c.index_select(0, rows) for c in self.layers]
        self.lengths = self.lengths.index_select(0, rows)
