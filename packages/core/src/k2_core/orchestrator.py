"""The orchestrator: builds a run from the registry, then runs the training loop.

Every concern enters through a slot (model parts, optimizer, schedule, dataset, backend,
tracker) or a hook (`k2_on_run_start`, `k2_on_step_end`, `k2_on_checkpoint`,
`k2_on_run_end`); the tracker itself is attached as a hook implementation on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .config import RunConfig
from .errors import K2Error
from .hookspecs import hookimpl
from .plugins import Plugins, get_plugins
from .precision import autocast
from .trainstate import list_checkpoints


class TrainingError(K2Error):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""

    kind = "training"


@dataclass
class Run:
    """Everything one training run holds; hooks receive it as `run`."""

    config: RunConfig
    plugins: Plugins
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    val_loader: Any
    backend: Any
    run_dir: str
    step: int = 0
    tracking_run_id: str | None = None
    skipped_steps: int = 0
    val_start: dict[str, Any] | None = (
        None  # the val loader's initial state: every eval reads the same batches
    )
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_attrs: dict[str, Any] = field(
        default_factory=dict
    )  # the checkpoint's attrs, if resumed

    @property
    def checkpoint_root(self) -> str:
        """Where this run's checkpoints live."""
        return f"{self.run_dir.rstrip('/')}/checkpoints"

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step on this rank."""
        t = self.config.train
        return t.micro_batch_size * t.grad_accum * self.config.data.seq_len


class TrackerHooks:
    """Forwards the lifecycle hooks to a `tracker` implementation (rank 0 only)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    @hookimpl
    def k2_on_run_start(self, run: Run) -> None:
        """Open (or reopen, after a resume) the tracking run with params and config."""
        from .tracking import flatten

        params = flatten(run.config.model_dump(mode="json"))
        params.update({f"plugin.{p.distribution}": p.version for p in run.plugins.loaded})
        run.tracking_run_id = self.tracker.start(
            run_name=run.config.name,
            params=params,
            config=run.config.model_dump(mode="json"),
            run_id=run.tracking_run_id,
        )

    @hookimpl
    def k2_on_step_end(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        """Queue this step's metrics (the run id may appear late if the store was down)."""
        if metrics:
            self.tracker.log_metrics(metrics, step)
        run.tracking_run_id = self.tracker.run_id or run.tracking_run_id

    @hookimpl
    def k2_on_run_end(self, run: Run, status: str) -> None:
        """Flush and close the tracking run."""
        self.tracker.end(status)


def build_dataset(
    cfg: RunConfig, plugins: Plugins, split: str, rank: int = 0, world_size: int = 1
) -> Any:
    """The config's `dataset` implementation for `split`, sharded for `rank` of `world_size`."""
    return plugins.registry.build(
        "dataset",
        cfg.data.dataset,
        options=cfg.data.options,
        where="data.options",
        split=split,
        batch_size=cfg.train.micro_batch_size,
        seq_len=cfg.data.seq_len,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


def build_run(cfg: RunConfig, plugins: Plugins | None = None, *, dry_run: bool = False) -> Run:
    """Resolve every slot of `cfg`, build the parts, and resume when a checkpoint exists.

    The model is built on the meta device; the backend materialises and initialises only
    what this process trains (see `k2_core.backend`). `dry_run` (e.g. `k2 plan --dry-run`,
    a backend on the meta device): no dataset, no resume, no tracker, nothing on disk; the
    caller feeds the batches.
    """
    from .checkpoint import check_checkpoint_dir
    from .model import build_model

    plugins = plugins or get_plugins()
    reg = plugins.registry
    if not dry_run:  # a bad checkpoint.dir fails before anything is built
        check_checkpoint_dir(cfg.checkpoint.dir)
    torch.manual_seed(cfg.train.seed)
    backend = reg.build(
        "backend", cfg.parallel.backend, options=cfg.parallel.options, where="parallel.options"
    )
    if not dry_run:  # before anything is allocated
        from .memcheck import check_memory_fits

        check_memory_fits(cfg, backend)
    model = backend.parallelize(build_model(cfg, reg, device="meta"), cfg.train.seed)
    if cfg.train.compile and not dry_run:  # after the backend: both backends, one place
        from .compile import compile_blocks

        compile_blocks(model)
    optimizer = reg.build(
        "optimizer",
        cfg.optim.name,
        model,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        options=cfg.optim.options,
        where="optim.options",
    )
    optimizer = backend.wrap_optimizer(model, optimizer)
    scheduler = reg.build(
        "lr_schedule",
        cfg.optim.schedule,
        optimizer,
        total_steps=cfg.train.steps,
        options=cfg.optim.schedule_options,
        where="optim.schedule_options",
    )
    # ranks that hold the same model part read the same shard; later pipeline stages none
    shard = {"rank": backend.data_rank, "world_size": backend.data_world_size}
    loader = val = None
    if backend.reads_data and not dry_run:
        loader = build_dataset(cfg, plugins, "train", **shard)
        val = build_dataset(cfg, plugins, "val", **shard) if cfg.train.eval_every else None
    run = Run(cfg, plugins, model, optimizer, scheduler, loader, val, backend, cfg.checkpoint.dir)
    if val is not None and hasattr(val, "state_dict"):
        run.val_start = val.state_dict()
    resume = "never" if dry_run else cfg.checkpoint.resume
    uri = None
    if resume == "auto":
        found = list_checkpoints(run.checkpoint_root)
        uri = found[-1][1] if found else None
    elif resume != "never":
        uri = resume
    if uri is not None:
        attrs = backend.load_train_state(
            uri, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader
        )
        run.step, run.tracking_run_id = attrs["step"], attrs.get("tracking_run_id")
        run.resumed_attrs = attrs
    if cfg.tracking.tracker and backend.rank == 0 and not dry_run:
        tracker = reg.build(
            "tracker",
            cfg.tracking.tracker,
            options=cfg.tracking.options,
            where="tracking.options",
            tracking_uri=cfg.tracking.tracking_uri,
            experiment=cfg.tracking.experiment,
            run_dir=run.run_dir,
        )
        if plugins.pm.has_plugin("k2-tracker"):  # a previous run in this process
            plugins.pm.unregister(name="k2-tracker")
        plugins.pm.register(TrackerHooks(tracker), name="k2-tracker")
    return run


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    batches: int,
    bf16: bool = False,
    device: torch.device | str = "cpu",
) -> float:
    """Mean validation loss over `batches` batches of `loader` (max-logit recording off)."""
    was_training = model.training
    device = torch.device(device)
    model.eval()
    model.set_record_max_logits(False)
    total, it = torch.zeros((), device=device), iter(loader)
    for _ in range(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        with autocast(device.type, torch.bfloat16, enabled=bf16):
            total += model(**batch, return_logits=False).loss.float()
    model.train(was_training)
    return float(total) / batches


def _step_metrics(
    run: Run, loss: float, grad_norm: float, dt: float, steps: int
) -> dict[str, float]:
    """This step's scalars: loss, lr, throughput, attention max logits, QK-Clip, MoE load."""
    m = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": run.scheduler.get_last_lr()[0],
        "train/tokens_per_s": run.tokens_per_step * run.backend.world_size * steps / max(dt, 1e-9),
    }
    logits = run.model.max_logits()  # [layers, heads], pre-clip
    if logits.numel():
        per_layer = logits.amax(dim=1).tolist()
        m["attn/max_logit"] = max(per_layer)
        m.update({f"attn/max_logit/layer_{i}": v for i, v in enumerate(per_layer)})
    stats = getattr(run.optimizer, "last_clip_stats", None) or {}
    m["qk_clip/heads_clipped"] = float(stats.get("heads_clipped", 0))
    loads = {i: float(s["max_over_mean"]) for i, s in run.model.load_stats().items()}
    if loads:
        m["moe/load_imbalance"] = max(loads.values())
        m.update({f"moe/load_imbalance/layer_{i}": v for i, v in loads.items()})
    return m


def _measure(
    run: Run,
    into: dict[str, float],
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    dt: float,
    steps: int,
) -> None:
    into.update(_step_metrics(run, float(loss), float(grad_norm), dt, steps))


def apply_update(
    run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, before_bias: Any = None
) -> bool:
    """The one update sequence after a step's gradients are reduced and clipped: finite
    check, optimizer step, schedule, `before_bias()` (e.g. metrics that read this step's
    expert load), router-bias update, zero-grad. False (and nothing applied) if non-finite."""
    if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # one sync a step
        run.optimizer.zero_grad(set_to_none=True)
        run.model.reset_router_counts()
        return False
    run.optimizer.step()
    run.scheduler.step()
    if before_bias is not None:
        before_bias()
    run.model.update_router_bias()
    run.optimizer.zero_grad(set_to_none=True)
    return True


def train(run: Run, progress: Any = None) -> dict[str, Any]:
    """The training loop; `progress(run, metrics)` is called on every logged step."""
    cfg, model, hook, backend = run.config, run.model, run.plugins.hook, run.backend
    model.train()
    model.set_record_max_logits(True)
    hook.k2_on_run_start(run=run)
    status, bad = "FAILED", 0
    batches = iter(run.loader) if run.loader is not None else None
    t_log, steps_since = time.perf_counter(), 0
    try:
        while run.step < cfg.train.steps:
            model.reset_max_logits()
            loss, grad_norm = backend.train_step(run, batches)
            metrics: dict[str, float] = {}
            log = (run.step + 1) % cfg.train.log_every == 0 or run.step + 1 in (1, cfg.train.steps)
            measure = (
                partial(
                    _measure,
                    run,
                    metrics,
                    loss,
                    grad_norm,
                    time.perf_counter() - t_log,
                    steps_since + 1,
                )
                if log
                else None
            )
            if not apply_update(run, loss, grad_norm, measure):
                bad, run.skipped_steps = bad + 1, run.skipped_steps + 1
                hook.k2_on_step_end(
                    run=run, step=run.step, metrics={"train/skipped_steps": run.skipped_steps}
                )
                if bad >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"{bad} non-finite steps in a row at step {run.step}; "
                        "the last good checkpoint is intact"
                    )
                continue
            bad = 0
            run.step += 1
            steps_since += 1
            if run.val_loader is not None or not backend.reads_data:
                if cfg.train.eval_every and (
                    run.step % cfg.train.eval_every == 0 or run.step == cfg.train.steps
                ):
                    if run.val_start is not None:
                        run.val_loader.load_state_dict(run.val_start)
                    metrics["eval/loss"] = backend.evaluate(run)
                    model.set_record_max_logits(True)
            hook.k2_on_step_end(run=run, step=run.step, metrics=metrics)
            if log:
                run.history.append({"step": run.step, **metrics})
                if progress is not None and backend.rank == 0:  # one console line per step
                    progress(run, metrics)
                t_log, steps_since = time.perf_counter(), 0
            if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps:
                save_checkpoint(run)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        hook.k2_on_run_end(run=run, status=status)
    return summarize(run)


def save_checkpoint(run: Run) -> str:
    """Checkpoint the whole run state now, then broadcast `k2_on_checkpoint`."""
    uri = run.backend.save_train_state(
        run.checkpoint_root,
        run.step,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        loader=run.loader,
        keep=run.config.checkpoint.keep,
        attrs={
            "tracking_run_id": run.tracking_run_id,
            "run_config": run.config.model_dump(mode="json"),
        },
    )
    run.plugins.hook.k2_on_checkpoint(run=run, step=run.step, uri=uri)
    return uri


def summarize(run: Run) -> dict[str, Any]:
    """The end-of-run summary: steps, first and last loss, throughput, where things are."""
    losses = [h["train/loss"] for h in run.history if "train/loss" in h]
    speeds = [h["train/tokens_per_s"] for h in run.history[1:] if "train/tokens_per_s" in h]
    evals = [h["eval/loss"] for h in run.history if "eval/loss" in h]
    return {
        "steps": run.step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "skipped_steps": run.skipped_steps,
        "run_dir": run.run_dir,
        "tracking_run_id": run.tracking_run_id,
        "rank": run.backend.rank,
    }
