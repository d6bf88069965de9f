"""The experiment harness: arms of one config run as tracked runs under a parent run, then a
plot and a report.

Every `k2 experiment` (k2_core.studies' `qk_clip` and `muon_vs_adamw`, k2_rl's `sparsity`,
`heads` and `rephrase`) is built from these pieces and nothing else:

- an `Arm` per run: a label and the dotted overrides that make it that arm; `run_arms` trains
  each through the orchestrator (`build_run` / `train`) and keeps its history and summary;
- a `ParentRun` in the mlflow experiment, whose children the arms become (tracking failures
  cost only the nesting, never the experiment);
- `save_plot` (one matplotlib figure of 1 x n panels, written as a PNG; skipped without
  matplotlib) and `conclude` (the PNG and `report.md` when every arm finished, then the parent
  run closed with the metrics and files);
- `execute` (output folder, torch threads, wall time) around an experiment function, and
  `add_arguments` / `print_result`, the command line every experiment command shares.

Helpers: `scaled_steps`, `cadence` (log/eval every), `tracking_uri`, `series` (one metric of an
arm's history), `fmt` (a table cell). Import-light: torch and mlflow load when something runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINISHED = "FINISHED"


@dataclass
class Arm:
    """One run of an experiment: a label and the overrides that make it that arm."""

    label: str
    overrides: list[str]
    group: str = ""  # e.g. the optimizer, for experiments that sweep within a group
    lr: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_step: int = 0


def scaled_steps(base: int, scale: float) -> int:
    """`base` steps times `scale`, at least 2."""
    return max(2, round(base * scale))


def cadence(steps: int, points: int = 60, evals: int = 10) -> tuple[int, int]:
    """(log_every, eval_every): about `points` logged steps and `evals` evaluations, the
    evaluations on logged steps (so they land in the run's history too)."""
    log_every = max(1, steps // points)
    eval_every = log_every * max(1, round(steps / (evals * log_every)))
    return log_every, eval_every


def tracking_uri(out: Path, overrides: Sequence[str]) -> str:
    """The tracking URI an override names, else $MLFLOW_TRACKING_URI, else a sqlite file in
    `out`."""
    for o in overrides:
        if o.startswith("tracking.tracking_uri="):
            return o.partition("=")[2]
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(out.resolve() / "mlflow.db")


class ParentRun:
    """An experiment's parent mlflow run; arms are tagged as its children. Tracking failures only
    cost the nesting, never the experiment."""

    def __init__(self, uri: str, experiment: str, out: Path, name: str, params: dict[str, Any]):
        self.run_id: str | None = None
        try:
            import logging

            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = (out.resolve() / "artifacts").as_uri() if uri.startswith("sqlite:") else None
                exp_id = self.client.create_experiment(experiment, artifact_location=loc)
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=name, tags={"k2.study": name})
            self.run_id = run.info.run_id
            for k, v in params.items():
                self.client.log_param(self.run_id, k, str(v)[:6000])
        except Exception as e:  # no mlflow store: the arms still run (tracked or not)
            print(f"k2 experiment: warning: no parent mlflow run ({type(e).__name__}: {e})")

    def adopt(self, child_id: str | None) -> None:
        """Tag run `child_id` as a child of this run."""
        if self.run_id and child_id:
            self.client.set_tag(child_id, "mlflow.parentRunId", self.run_id)

    def finish(self, metrics: dict[str, float], files: list[Path], status: str) -> None:
        """Log the finite metrics and the files that exist, then end the run with `status`."""
        if not self.run_id:
            return
        try:
            for k, v in metrics.items():
                if v is not None and math.isfinite(v):
                    self.client.log_metric(self.run_id, k, float(v))
            for f in files:
                if f.exists():
                    self.client.log_artifact(self.run_id, str(f))
        except Exception as e:
            print(
                f"k2 experiment: warning: parent run artifacts not logged ({type(e).__name__}: {e})"
            )
        self.client.set_terminated(self.run_id, status=status)


def run_arm(arm: Arm, preset: str, echo: Callable[[str], None] | None) -> None:
    """Train one arm (preset/YAML plus its overrides) and keep its summary and history."""
    from .configio import load_config
    from .orchestrator import build_run, train
    from .plugins import load_plugins

    cfg = load_config(preset, arm.overrides)

    def progress(run: Any, m: dict[str, float]) -> None:
        if echo is None:
            return
        ev = f"  eval {m['eval/loss']:.3f}" if "eval/loss" in m else ""
        echo(
            f"  [{arm.label}] step {run.step}/{cfg.train.steps}"
            f"  loss {m.get('train/loss', math.nan):.3f}"
            f"  max logit {m.get('attn/max_logit', math.nan):.1f}"
            f"  clipped {m.get('qk_clip/heads_clipped', 0):.0f}{ev}"
        )

    t0 = time.perf_counter()
    run = build_run(cfg, load_plugins())  # fresh plugins: each run registers its own tracker hook
    arm.summary = train(run, progress)
    arm.seconds = time.perf_counter() - t0
    arm.history = list(run.history)
    arm.tokens_per_step = run.tokens_per_step


def run_arms(
    arms: list[Arm], parent: ParentRun, preset: str, echo: Callable[[str], None] | None
) -> str:
    """Run every arm in turn, nesting each under the parent run; FINISHED when all did."""
    for arm in arms:
        run_arm(arm, preset, echo)
        parent.adopt(arm.summary.get("tracking_run_id"))
    return FINISHED


def series(arm: Arm, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric `key` in the arm's history."""
    pts = [(int(h["step"]), float(h[key])) for h in arm.history if key in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def fmt(v: Any, nd: int = 3) -> str:
    """A report table cell: `-` for None, floats to `nd` decimals."""
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plot(
    path: Path,
    draw: Callable[..., None],
    *,
    panels: int = 2,
    figsize: tuple[float, float] = (12, 4.5),
    sharey: bool = False,
) -> Path | None:
    """A figure of 1 x `panels` gridded axes, filled by `draw(plt, *axes)`, saved as a PNG at
    `path`; None (and no file) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, panels, figsize=figsize, sharey=sharey, squeeze=False)
    axes = tuple(axes[0])
    draw(plt, *axes)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def conclude(
    out: Path,
    parent: ParentRun,
    status: str,
    metrics: dict[str, float],
    *,
    plot: Callable[[], Path | None],
    report: Callable[[Path | None], str],
) -> tuple[Path | None, Path]:
    """When every arm finished: `plot()` the PNG and write `report(png)` to out/report.md; then
    close the parent run (metrics, files, status). Returns (png or None, report path)."""
    png = plot() if status == FINISHED else None
    path = out / "report.md"
    if status == FINISHED:
        path.write_text(report(png))
    parent.finish(metrics, [p for p in (png, path) if p], status)
    return png, path


def execute(
    fn: Callable[..., dict[str, Any]],
    out_dir: str,
    scale: float,
    overrides: list[str],
    num_threads: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run experiment function `fn(out, scale, overrides, **kwargs)` in folder `out_dir` (made if
    missing) with `num_threads` torch CPU threads (restored after); adds `seconds` to its result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    try:
        result = fn(out, scale, list(overrides), **kwargs)
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def add_arguments(
    p: argparse.ArgumentParser, names: Sequence[str], *, default_out: str, config: bool = False
) -> None:
    """An experiment command's arguments: NAME [CONFIG] [overrides ...] --out --scale --threads
    --json."""
    p.add_argument("name", choices=names)
    if config:
        p.add_argument("config", nargs="?", default=None, help="preset name or YAML (default tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
    p.add_argument("--out", help=f"output folder (default {default_out})")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies the experiment's size (steps; rephrase: world and steps)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON")


def print_result(command: str, result: dict[str, Any], as_json: bool) -> int:
    """Print an experiment's result as JSON, or as one line (seconds, report, plot, mlflow); 0."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    mlflow_experiment = result.get("mlflow_experiment", result.get("experiment"))
    print(
        f"{command}: {result['seconds']:.0f}s; report {result['report']}; plot {result['png']}; "
        f"mlflow {result['tracking_uri']} experiment {mlflow_experiment}"
    )
    return 0
