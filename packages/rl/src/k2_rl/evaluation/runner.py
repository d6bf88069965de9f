"""`run_eval`: the asked tasks on one checkpoint, results as a dict, a table and in mlflow.

Metrics are logged as `eval/<task>/<metric>` at the checkpoint's step, into the checkpoint's
own training run when it has one (the run id is in the checkpoint's attrs; its store is the
run's tracking URI, else the run folder's `mlflow.db`), else into a new run of experiment
`k2-eval`. Tracking failures never lose the results: they are returned and printed anyway.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from .options import TASK_NAMES, EvalOptions


def parse_tasks(spec: str | list[str]) -> list[str]:
    """`a,b` (or a list) -> task names, checked; `all` means every task."""
    from k2_core.errors import ConfigError

    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(TASK_NAMES)
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ConfigError(
            f"--tasks: unknown task {bad[0]!r}; tasks: {', '.join(TASK_NAMES)}"
            if bad
            else f"--tasks: name at least one of {', '.join(TASK_NAMES)}"
        )
    return list(dict.fromkeys(names))


def eval_options(overrides: list[str] | None = None) -> EvalOptions:
    """EvalOptions from dotted overrides (`arithmetic.k=8`), with one-line errors."""
    from k2_core.configio import apply_overrides, describe_validation_error
    from k2_core.errors import ConfigError
    from pydantic import ValidationError

    try:
        return EvalOptions.model_validate(apply_overrides({}, list(overrides or [])))
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, model=EvalOptions)) from None


def run_eval(
    uri: str,
    tasks: list[str],
    *,
    options: EvalOptions | None = None,
    limit: int | None = None,
    data: str | None = None,
    tokenizer: str | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    target: Any = None,
    echo: Any = None,
    **task_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate checkpoint `uri` on `tasks`; returns {uri, step, tasks: {task: metrics}, ...}.

    `target` (an EvalTarget) skips loading; `task_kwargs` go to every task (e.g. `world=`).
    """
    import torch
    from k2_core.errors import ConfigError

    from .target import load_target
    from .tasks import TASKS

    options = options or EvalOptions()
    tasks = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    target = target or load_target(uri, data=data, tokenizer=tokenizer)
    torch.manual_seed(options.seed)
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in tasks:
        t0 = time.perf_counter()
        results[name] = TASKS[name](
            target,
            getattr(options, name),
            limit,
            batch_size=options.batch_size,
            seed=options.seed,
            **task_kwargs,
        )
        seconds[name] = round(time.perf_counter() - t0, 1)
        if echo is not None:
            echo(
                f"  {name}: "
                + ", ".join(f"{k} {_num(v)}" for k, v in results[name].items())
                + f" ({seconds[name]}s)"
            )
    out: dict[str, Any] = {
        "uri": uri,
        "step": target.step,
        "tasks": results,
        "seconds": seconds,
        "limit": limit,
        "options": options.model_dump(mode="json"),
    }
    out["tracking"] = log_results(target, out, tracking_uri) if track else None
    return out


def _num(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"


def metrics_of(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{eval/<task>/<metric>: value} of the finite results."""
    return {
        f"eval/{t}/{k}": float(v)
        for t, m in results.items()
        for k, v in m.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }


def _run_store(target: Any) -> str | None:
    """The tracking URI of the checkpoint's training run, when one can be found."""
    cfg = target.config
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = target.run_dir()
    if run_dir is None and cfg is not None and Path(cfg.checkpoint.dir).is_dir():
        run_dir = Path(cfg.checkpoint.dir)
    if run_dir is not None and (run_dir / "mlflow.db").exists():
        return "sqlite:///" + str(run_dir.resolve() / "mlflow.db")
    return None


def log_results(
    target: Any, result: dict[str, Any], tracking_uri: str | None = None
) -> dict[str, Any]:
    """Log the metrics (and the whole result as `eval/step_N.json`) to mlflow; returns where."""
    import logging

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    step = int(result["step"] or 0)
    metrics = metrics_of(result["tasks"])
    try:
        uri, run_id, attached = tracking_uri, None, False
        if uri is None and target.tracking_run_id:
            uri = _run_store(target)
        if uri is not None and target.tracking_run_id:
            client = MlflowClient(tracking_uri=uri)
            try:
                run = client.get_run(target.tracking_run_id)
                attached = run.info.lifecycle_stage == "active"
                run_id = run.info.run_id if attached else None
            except Exception:  # not in this store: a new run below
                run_id = None
        if run_id is None:
            uri = (
                uri
                or os.environ.get("MLFLOW_TRACKING_URI")
                or ("sqlite:///" + str(Path("runs/eval").resolve() / "mlflow.db"))
            )
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name("k2-eval")
            exp_id = exp.experiment_id if exp else client.create_experiment("k2-eval")
            run_id = client.create_run(
                exp_id, run_name=f"eval {Path(target.uri).name}", tags={"k2.checkpoint": target.uri}
            ).info.run_id
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        client.log_dict(run_id, result | {"tracking": None}, f"eval/step_{step:08d}.json")
        if not attached:
            client.set_terminated(run_id, "FINISHED")
        return {"tracking_uri": uri, "run_id": run_id, "attached_to_training_run": attached}
    except Exception as e:  # the results stand without the store
        print(f"k2 eval: warning: results not logged to mlflow ({type(e).__name__}: {e})")
        return {"error": f"{type(e).__name__}: {e}"}


def format_table(result: dict[str, Any]) -> str:
    """The results as an aligned text table: task, metric, value."""
    rows = [(t, k, _num(v)) for t, m in result["tasks"].items() for k, v in m.items()]
    w = [max(len(r[i]) for r in [("TASK", "METRIC", "VALUE"), *rows]) for i in range(3)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(("TASK", "METRIC", "VALUE"))).rstrip()]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)
