"""What every k2-rl experiment shares beyond k2_core's harness: its base overrides and small
curve helpers.

The harness itself (an `Arm`, the parent run, running arms in turn, the plot frame, the report
and parent-run close) is `k2_core.harness`, shared with the studies of k2_core.studies, so that
every `k2 experiment` writes the same kind of runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from k2_core.harness import Arm, cadence

# Every experiment arm: 2 layers of the `tiny` preset (its MLA and expert widths unchanged)
# and micro-batches of 4 x 256 tokens, about half a second a step on one CPU core.
EXPERIMENT_MODEL = [
    "model.num_hidden_layers=2",
    "train.micro_batch_size=4",
]


def experiment_name(name: str) -> str:
    """The mlflow experiment that holds experiment `name`'s parent run and arms."""
    return f"experiment-{name}"


def base_overrides(
    name: str,
    steps: int,
    uri: str,
    evals: int = 10,
    warmup: int | None = None,
    eval_batches: int = 4,
) -> list[str]:
    """Overrides shared by every arm of experiment `name` (before its own and the user's)."""
    log_every, eval_every = cadence(steps, evals=evals)
    return [
        *EXPERIMENT_MODEL,
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"train.eval_every={eval_every}",
        f"train.eval_batches={eval_batches}",
        "optim.schedule=wsd",
        "optim.schedule_options.warmup_steps="
        f"{warmup if warmup is not None else max(1, steps // 10)}",
        f"tracking.experiment={experiment_name(name)}",
        f"tracking.tracking_uri={uri}",
        "tracking.options.system_metrics=false",
        "checkpoint.resume=never",
        f"checkpoint.every={steps}",
        "checkpoint.keep=1",
    ]


def arm_dir(out: Path, label: str) -> Path:
    """The run folder of arm `label` inside the experiment's output folder."""
    return out / "runs" / label.replace(" ", "_").replace("=", "")


def final_checkpoint(arm: Arm, out: Path, steps: int) -> str:
    """URI of the arm's last training checkpoint."""
    return str(arm_dir(out, arm.label) / "checkpoints" / f"step_{steps:08d}")


def running_min(ys: list[float]) -> list[float]:
    """The best value so far at each point (an eval curve made monotone)."""
    out, best = [], math.inf
    for y in ys:
        best = min(best, y)
        out.append(best)
    return out


def first_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The x at which the curve's running minimum first reaches `target`, interpolated
    linearly between evaluations; None when it never does."""
    best = running_min(ys)
    for i, y in enumerate(best):
        if y <= target:
            if i == 0 or best[i - 1] == y:
                return xs[i]
            x0, y0 = xs[i - 1], best[i - 1]
            return x0 + (xs[i] - x0) * (y0 - target) / (y0 - y)
    return None


def finite(d: dict[str, Any]) -> dict[str, float]:
    """The finite float entries of `d` (the ones mlflow can log as metrics)."""
    return {
        k: float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
