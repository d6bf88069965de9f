"""MLA's compressed KV cache for incremental decoding.

Per layer it keeps what MLA compresses a token into, not the per-head keys and values: the
normed kv latent (kv_lora_rank) and the rotated rotary key shared by all heads (rope dim), side
by side in one [B, capacity, kv_lora_rank + rope] tensor so decode attends to it with a single
matmul (the up-projection is absorbed into the query). Rows are ragged: row b holds
`lengths[b]` tokens at slots 0..lengths[b]-1; new tokens are written at slot lengths[b] on.

While every row holds the same number of tokens (no right-padded prefill; the host knows,
`uniform`), a forward writes its tokens into one slice of slots and a one-token step needs no
visibility mask; the rotary cos/sin of every slot are computed once per cache, not per step.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    """Compressed per-layer caches plus each row's length; rows can be dropped (`select`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
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
        # Host-side: every row holds exactly max_length tokens (lengths == max_length).
        self.uniform = True
        # Set by the model for the forward in progress (see `begin`).
        self.write_index: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._rope: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return self.lengths.shape[0]

    def is_empty(self) -> bool:
        """True before the first forward (prefill may use the uncached attention path)."""
        return self.max_length == 0

    def begin(self, n_new: int) -> torch.Tensor:
        """Prepare a forward of `n_new` tokens per row; returns their positions [B, n_new]
        ([1, n_new] while the rows are uniform). `visible` is None for a one-token step of
        uniform rows (every cached slot is visible)."""
        if self.max_length + n_new > self.capacity:
            raise ValueError(
                f"KV cache full: {self.max_length} + {n_new} > capacity {self.capacity}"
            )
        dev = self.lengths.device
        end = self.max_length + n_new
        if self.uniform:
            self.write_index = torch.arange(self.max_length, end, device=dev)[None]  # [1, T]
            self.visible = None
            if n_new > 1:
                slots = torch.arange(end, device=dev)
                self.visible = (slots[None, :] <= self.write_index[0][:, None])[None].expand(
                    self.batch_size, -1, -1
                )  # [B, T, end]: causal among the new tokens
            return self.write_index
        self._rows = torch.arange(self.batch_size, device=dev)[:, None]
        steps = torch.arange(n_new, device=dev)
        self.write_index = self.lengths[:, None] + steps  # [B, T]
        slots = torch.arange(end, device=dev)
        # query t of row b sees slots 0..lengths[b]+t (its own token included)
        self.visible = slots[None, None, :] <= self.write_index[:, :, None]  # [B, T, end]
        return self.write_index

    def rotary(
        self, rotary_emb: torch.nn.Module, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B|1, T, rope/2] of this forward's positions (after `begin`), looked up
        in a table of every slot that `rotary_emb` fills once per cache and dtype."""
        table = self._rope.get(dtype)
        if table is None:
            slots = torch.arange(self.capacity, device=self.lengths.device)[None]
            table = self._rope[dtype] = rotary_emb(slots, dtype)
        idx = self.write_index
        if self.uniform:
            lo, hi = self.max_length, self.max_length + idx.shape[1]
            return table[0][:, lo:hi], table[1][:, lo:hi]
        return table[0][0][idx], table[1][0][idx]

    def write(self, layer: int, entries: torch.Tensor) -> torch.Tensor:
        """Store entries [B, T, kv_lora+rope] at this forward's slots; returns the used prefix."""
        cache = self.layers[layer]
        end = self.max_length + entries.shape[1]
        if self.uniform:
            cache[:, self.max_length : end] = entries
        else:
            cache[self._rows, self.write_index] = entries.to(cache.dtype)
        return cache[:, :end]

    def commit(self, n_valid: torch.Tensor | int, n_new: int) -> None:
        """After a forward of `n_new` tokens: each row keeps `n_valid` of them (right padding)."""
        if isinstance(n_valid, int):
            if n_valid != n_new:
                self.uniform = False
        else:
            self.uniform = False  # per-row counts (unknown to the host)
        self.lengths = self.lengths + n_valid
        self.max_length += n_new
        self.write_index = None
        self.visible = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a 1-D index), e.g. after some sequences finished."""
        self.layers = [c.index_select(0, rows) for c in self.layers]
        self.lengths = self.lengths.index_select(0, rows)
