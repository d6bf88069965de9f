"""Learning-rate multipliers for torch.optim.lr_scheduler.LambdaLR: WSD and cosine.

Both are small callable objects (picklable, and LambdaLR saves their fields in its
state_dict). The multiplier at step s (0-based, as LambdaLR counts):
  warm-up   s < W:            (s + 1) / W  (reaches 1.0 at step W - 1)
  stable    W <= s < W + S:   1.0
  decay     next D steps:     cosine 1 -> min_lr_ratio (or linear)
  after:                      min_lr_ratio
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WSDSchedule:
    """Warm-up, stable, decay multiplier (see module doc)."""

    warmup_steps: int
    stable_steps: int
    decay_steps: int
    min_lr_ratio: float = 0.1
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if min(self.warmup_steps, self.stable_steps, self.decay_steps) < 0:
            raise ValueError("steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}")

    def __call__(self, step: int) -> float:
        w, s, d, lo = self.warmup_steps, self.stable_steps, self.decay_steps, self.min_lr_ratio
        if step < w:
            return (step + 1) / w
        t = step - w - s
        if t < 0:
            return 1.0
        if d == 0 or t >= d:
            return lo if d > 0 else 1.0
        frac = t / d
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if self.decay == "cosine" else 1.0 - frac
        return lo + (1.0 - lo) * shape


def wsd_schedule(
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    decay: str = "cosine",
) -> WSDSchedule:
    """K2's warm-up / stable / decay multiplier (K2: 500 warm-up, constant, cosine to 0.1x)."""
    return WSDSchedule(warmup_steps, stable_steps, decay_steps, min_lr_ratio, decay)


def cosine_schedule(warmup: int, total: int, min_ratio: float = 0.1) -> WSDSchedule:
    """Linear warm-up over `warmup` steps, then cosine to `min_ratio` at step `total`."""
    if total < warmup:
        raise ValueError(f"total ({total}) must be >= warmup ({warmup})")
    return WSDSchedule(warmup, 0, total - warmup, min_ratio, "cosine")
