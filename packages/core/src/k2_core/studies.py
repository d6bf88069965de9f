"""Small, reproducible training studies on CPU: ordinary tracked runs compared side by side.

Each study trains a few arms of the same config through the orchestrator (`build_run` /
`train`), logs them as runs of one mlflow experiment `study-<name>` nested under a parent run,
and writes `<name>.png` and `report.md` into its output folder.

- `qk_clip`: plain Muon at an aggressive lr (the max attention logit runs away) against
  MuonClip at the same settings with a small tau (the max logit is held at about tau).
- `muon_vs_adamw`: MuonClip against AdamW at equal tokens, a small lr sweep for each, with
  validation-loss curves side by side.

`scale` multiplies the step counts (1.0: the defaults below, a few minutes each on 2 CPU
cores); `overrides` (dotted `a.b=value`) apply to every arm after the study's own settings,
but the keys that define an arm (optimizer name and options, lr in a sweep, run folder, run
name) are set last. Plotting needs matplotlib (imported lazily; without it the report is
still written and the PNG is skipped).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The variant both studies train: the `tiny` preset cut to 2 layers (1 dense + 1 MoE, the MLA
# attention unchanged: 8 heads, qk head dim 32+16) and micro-batches of 4 x 256 tokens, so
# that one step takes ~0.5 s on one CPU core.
STUDY_MODEL = [
    "model.num_hidden_layers=2",
    "train.micro_batch_size=4",
]

# qk_clip: the lr that makes plain Muon's max logit run away on STUDY_MODEL (10x tiny's 3e-3),
# and a tau that a healthy run of this model stays under (see docs/studies.md).
QK_CLIP_LR = 3e-2
QK_CLIP_TAU = 20.0
QK_CLIP_STEPS = 300

MUON_VS_ADAMW_STEPS = 200
MUON_LRS = (3e-3, 1e-2)
ADAMW_LRS = (1e-3, 3e-3)


@dataclass
class Arm:
    """One run of a study: a label and the overrides that make it that arm."""

    label: str
    overrides: list[str]
    group: str = ""  # e.g. the optimizer, for studies that sweep within a group
    lr: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_step: int = 0


def _steps(base: int, scale: float) -> int:
    return max(2, round(base * scale))


def _cadence(steps: int, points: int = 60, evals: int = 10) -> tuple[int, int]:
    """(log_every, eval_every): about `points` logged steps and `evals` evaluations, the
    evaluations on logged steps (so they land in the run's history too)."""
    log_every = max(1, steps // points)
    eval_every = log_every * max(1, round(steps / (evals * log_every)))
    return log_every, eval_every


def _common(name: str, out: Path, steps: int, warmup: int, uri: str) -> list[str]:
    log_every, eval_every = _cadence(steps)
    return [
        *STUDY_MODEL,
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"train.eval_every={eval_every}",
        "optim.schedule=wsd",
        f"optim.schedule_options.warmup_steps={warmup}",
        f"tracking.experiment=study-{name}",
        f"tracking.tracking_uri={uri}",
        "tracking.options.system_metrics=false",
        "checkpoint.resume=never",
        f"checkpoint.every={steps}",
        "checkpoint.keep=1",
    ]


def _tracking_uri(out: Path, overrides: list[str]) -> str:
    for o in overrides:
        if o.startswith("tracking.tracking_uri="):
            return o.partition("=")[2]
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(out.resolve() / "mlflow.db")


class _Parent:
    """The study's parent mlflow run; arms are tagged as its children. Tracking failures only
    cost the nesting, never the study."""

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
            print(f"k2 study: warning: no parent mlflow run ({type(e).__name__}: {e})")

    def adopt(self, child_id: str | None) -> None:
        if self.run_id and child_id:
            self.client.set_tag(child_id, "mlflow.parentRunId", self.run_id)

    def finish(self, metrics: dict[str, float], files: list[Path], status: str) -> None:
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
            print(f"k2 study: warning: parent run artifacts not logged ({type(e).__name__}: {e})")
        self.client.set_terminated(self.run_id, status=status)


def _run_arm(arm: Arm, preset: str, echo: Callable[[str], None] | None) -> None:
    from .configio import load_config
    from .orchestrator import build_run, train
    from .plugins import load_plugins

    cfg = load_config(preset, arm.overrides)

    def progress(run: Any, m: dict[str, float]) -> None:
        if echo is None:
            return
        ev = f"  eval {m['eval/loss']:.3f}" if "eval/loss" in m else ""
        echo(f"  [{arm.label}] step {run.step}/{cfg.train.steps}  loss {m.get('train/loss', math.nan):.3f}"
             f"  max logit {m.get('attn/max_logit', math.nan):.1f}"
             f"  clipped {m.get('qk_clip/heads_clipped', 0):.0f}{ev}")

    t0 = time.perf_counter()
    run = build_run(cfg, load_plugins())  # fresh plugins: each run registers its own tracker hook
    arm.summary = train(run, progress)
    arm.seconds = time.perf_counter() - t0
    arm.history = list(run.history)
    arm.tokens_per_step = run.tokens_per_step


def _run_arms(arms: list[Arm], parent: Any, preset: str, echo: Callable[[str], None] | None) -> str:
    """Run every arm in turn, nesting each under the parent run; FINISHED when all did."""
    for arm in arms:
        _run_arm(arm, preset, echo)
        parent.adopt(arm.summary.get("tracking_run_id"))
    return "FINISHED"


def _series(arm: Arm, key: str) -> tuple[list[int], list[float]]:
    pts = [(int(h["step"]), float(h[key])) for h in arm.history if key in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def _stats(arm: Arm) -> dict[str, Any]:
    _, ml = _series(arm, "attn/max_logit")
    _, tl = _series(arm, "train/loss")
    _, el = _series(arm, "eval/loss")
    _, hc = _series(arm, "qk_clip/heads_clipped")
    tail = tl[-max(1, len(tl) // 10):]  # last ~10% of logged steps: single batches are noisy
    return {
        "peak_max_logit": max(ml) if ml else None,
        "final_max_logit": ml[-1] if ml else None,
        "final_train_loss": tl[-1] if tl else None,
        "mean_train_loss_last10pct": sum(tail) / len(tail) if tail else None,
        "final_eval_loss": el[-1] if el else None,
        "best_eval_loss": min(el) if el else None,
        "max_heads_clipped": max(hc) if hc else None,
        "seconds": round(arm.seconds, 1),
        "mlflow_run_id": arm.summary.get("tracking_run_id"),
    }


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


# -- qk_clip ----------------------------------------------------------------------------------


def qk_clip_study(out: Path, scale: float, overrides: list[str], preset: str = "tiny",
                  lr: float = QK_CLIP_LR, tau: float = QK_CLIP_TAU,
                  echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Plain Muon vs MuonClip(tau) at an aggressive lr: max logit and loss per step."""
    steps = _steps(QK_CLIP_STEPS, scale)
    uri = _tracking_uri(out, overrides)
    base = [*_common("qk_clip", out, steps, max(1, round(20 * scale)), uri), f"optim.lr={lr}",
            *overrides]
    arms = [
        Arm("muon", [*base, "optim.name=muon", "name=qk_clip-muon",
                     f"checkpoint.dir={out / 'runs' / 'muon'}"]),
        Arm("muonclip", [*base, "optim.name=muonclip", "optim.options.qk_clip=true",
                         f"optim.options.qk_clip_tau={tau}", "name=qk_clip-muonclip",
                         f"checkpoint.dir={out / 'runs' / 'muonclip'}"]),
    ]
    parent = _Parent(uri, "study-qk_clip", out, "qk_clip",
                     {"scale": scale, "steps": steps, "lr": lr, "tau": tau, "preset": preset,
                      "overrides": " ".join([*STUDY_MODEL, *overrides])})
    status = "FAILED"
    try:
        status = _run_arms(arms, parent, preset, echo)
    finally:
        stats = {a.label: _stats(a) for a in arms if a.history}
        png = _plot_qk_clip(out / "qk_clip.png", arms, tau) if status == "FINISHED" else None
        report = out / "report.md"
        if status == "FINISHED":
            report.write_text(_report_qk_clip(arms, stats, steps, lr, tau, preset, overrides, png))
        parent.finish({f"{a}/{k}": v for a, s in stats.items() for k, v in s.items()
                       if isinstance(v, float)}, [p for p in (png, report) if p], status)
    return {"study": "qk_clip", "out_dir": str(out), "png": str(png) if png else None,
            "report": str(report), "tracking_uri": uri, "experiment": "study-qk_clip",
            "parent_run_id": parent.run_id, "steps": steps, "lr": lr, "tau": tau, "arms": stats}


def _plot_qk_clip(path: Path, arms: list[Arm], tau: float) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"muon": "tab:red", "muonclip": "tab:blue"}
    for arm in arms:
        c = colors.get(arm.label)
        a1.plot(*_series(arm, "attn/max_logit"), label=arm.label, color=c)
        a2.plot(*_series(arm, "train/loss"), label=f"{arm.label} train", color=c, alpha=0.45)
        a2.plot(*_series(arm, "eval/loss"), "o-", label=f"{arm.label} eval", color=c)
    a1.axhline(tau, ls="--", color="gray", label=f"tau = {tau:g}")
    a1.set(xlabel="step", ylabel="max attention logit (pre-clip)", yscale="log",
           title="max attention logit")
    a2.set(xlabel="step", ylabel="loss", title="train / eval loss")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report_qk_clip(arms: list[Arm], stats: dict[str, Any], steps: int, lr: float, tau: float,
                    preset: str, overrides: list[str], png: Path | None) -> str:
    m, c = stats["muon"], stats["muonclip"]
    lines = [
        "# Study: qk_clip",
        "",
        f"`{preset}` with {' '.join(STUDY_MODEL)}{' ' + ' '.join(overrides) if overrides else ''}; "
        f"{steps} steps, lr {lr:g} (WSD), seed identical for both runs (same init and batches).",
        f"Arms: plain Muon (`optim.name=muon`) vs MuonClip (`optim.name=muonclip`, "
        f"qk_clip_tau={tau:g}). Max logit = pre-clip max over heads and layers of each logged step.",
        "",
        "| run | peak max logit | final max logit | peak / tau | max heads clipped | final train loss "
        "| mean train loss, last 10% | final eval loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        s = stats[a.label]
        ratio = s["peak_max_logit"] / tau if s["peak_max_logit"] is not None else None
        lines.append(
            f"| {a.label} | {_fmt(s['peak_max_logit'], 1)} | {_fmt(s['final_max_logit'], 1)} | "
            f"{_fmt(ratio, 2)} | {_fmt(s['max_heads_clipped'], 0)} | {_fmt(s['final_train_loss'])} | "
            f"{_fmt(s['mean_train_loss_last10pct'])} | {_fmt(s['final_eval_loss'])} | {s['seconds']} |")
    lines += ["", "## Reading"]
    if m["peak_max_logit"] is not None and c["peak_max_logit"] is not None:
        lines.append(
            f"- Muon's max logit peaked at {m['peak_max_logit']:.1f} ({m['peak_max_logit'] / tau:.1f}x "
            f"tau) and ended at {m['final_max_logit']:.1f}; MuonClip's peaked at "
            f"{c['peak_max_logit']:.1f} ({c['peak_max_logit'] / tau:.2f}x tau) and ended at "
            f"{c['final_max_logit']:.1f}.")
    if m["final_eval_loss"] is not None and c["final_eval_loss"] is not None:
        d = c["final_eval_loss"] - m["final_eval_loss"]
        lines.append(f"- Final eval loss: Muon {m['final_eval_loss']:.3f}, MuonClip "
                     f"{c['final_eval_loss']:.3f} (MuonClip {'+' if d >= 0 else ''}{d:.3f}).")
    if png:
        lines += ["", f"![qk_clip]({png.name})"]
    return "\n".join(lines) + "\n"


# -- muon_vs_adamw ------------------------------------------------------------------------------


def muon_vs_adamw_study(out: Path, scale: float, overrides: list[str], preset: str = "tiny",
                        muon_lrs: tuple[float, ...] = MUON_LRS,
                        adamw_lrs: tuple[float, ...] = ADAMW_LRS,
                        echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """MuonClip vs AdamW at equal tokens (same steps, batch, data order), a small lr sweep for
    each; validation loss vs step."""
    steps = _steps(MUON_VS_ADAMW_STEPS, scale)
    uri = _tracking_uri(out, overrides)
    base = [*_common("muon_vs_adamw", out, steps, max(1, round(20 * scale)), uri), *overrides]
    arms = [Arm(f"muonclip lr={lr:g}", [*base, "optim.name=muonclip", f"optim.lr={lr}",
                                          f"name=muon_vs_adamw-muonclip-{lr:g}",
                                          f"checkpoint.dir={out / 'runs' / f'muonclip-{lr:g}'}"],
                group="muonclip", lr=lr) for lr in muon_lrs]
    arms += [Arm(f"adamw lr={lr:g}", [*base, "optim.name=adamw", f"optim.lr={lr}",
                                      f"name=muon_vs_adamw-adamw-{lr:g}",
                                      f"checkpoint.dir={out / 'runs' / f'adamw-{lr:g}'}"],
                 group="adamw", lr=lr) for lr in adamw_lrs]
    parent = _Parent(uri, "study-muon_vs_adamw", out, "muon_vs_adamw",
                     {"scale": scale, "steps": steps, "muon_lrs": list(muon_lrs),
                      "adamw_lrs": list(adamw_lrs), "preset": preset,
                      "overrides": " ".join([*STUDY_MODEL, *overrides])})
    status = "FAILED"
    try:
        status = _run_arms(arms, parent, preset, echo)
    finally:
        stats = {a.label: _stats(a) for a in arms if a.history}
        best = _best(arms, stats)
        png = _plot_muon_vs_adamw(out / "muon_vs_adamw.png", arms, best) if status == "FINISHED" else None
        report = out / "report.md"
        if status == "FINISHED":
            report.write_text(_report_muon_vs_adamw(arms, stats, best, steps, preset, overrides, png))
        parent.finish({f"{a.replace(' ', '_').replace('=', '')}/{k}": v for a, s in stats.items()
                       for k, v in s.items() if isinstance(v, float)},
                      [p for p in (png, report) if p], status)
    tokens = steps * arms[0].tokens_per_step
    return {"study": "muon_vs_adamw", "out_dir": str(out), "png": str(png) if png else None,
            "report": str(report), "tracking_uri": uri, "experiment": "study-muon_vs_adamw",
            "parent_run_id": parent.run_id, "steps": steps, "tokens_per_run": tokens,
            "best": best, "arms": stats}


def _best(arms: list[Arm], stats: dict[str, Any]) -> dict[str, str]:
    """Per optimizer, the arm with the lowest final eval loss."""
    out: dict[str, str] = {}
    for a in arms:
        s = stats.get(a.label, {}).get("final_eval_loss")
        if s is None or not math.isfinite(s):
            continue
        cur = out.get(a.group)
        if cur is None or s < stats[cur]["final_eval_loss"]:
            out[a.group] = a.label
    return out


def _plot_muon_vs_adamw(path: Path, arms: list[Arm], best: dict[str, str]) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    styles = {"muonclip": ("tab:blue", a1), "adamw": ("tab:orange", a2)}
    shades = ["-", "--", ":", "-."]
    for i_group, group in enumerate(("muonclip", "adamw")):
        color, ax = styles[group]
        for i, arm in enumerate(a for a in arms if a.group == group):
            lw = 2.5 if best.get(group) == arm.label else 1.2
            ax.plot(*_series(arm, "eval/loss"), shades[i % len(shades)], marker="o", ms=3,
                    color=color, lw=lw, label=arm.label + (" (best)" if lw > 2 else ""))
        # the other optimizer's best, in grey, for a side-by-side reading
        other = best.get(("adamw", "muonclip")[i_group])
        for arm in arms:
            if arm.label == other:
                ax.plot(*_series(arm, "eval/loss"), color="gray", alpha=0.6, lw=1.5,
                        label=f"{arm.label} (best of the other)")
        ax.set(xlabel="step (equal tokens per step)", title=f"{group}: validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_ylabel("eval loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report_muon_vs_adamw(arms: list[Arm], stats: dict[str, Any], best: dict[str, str], steps: int,
                          preset: str, overrides: list[str], png: Path | None) -> str:
    tps = arms[0].tokens_per_step
    lines = [
        "# Study: muon_vs_adamw",
        "",
        f"`{preset}` with {' '.join(STUDY_MODEL)}{' ' + ' '.join(overrides) if overrides else ''}; "
        f"{steps} steps x {tps} tokens = {steps * tps:,} tokens per run, WSD schedule, same seed "
        "(same init and batches) for every run. MuonClip at its defaults (tau 100, momentum 0.95, "
        "update RMS matched to AdamW, AdamW on embeddings/head/router/norms at the same lr); "
        "AdamW = torch AdamW on every parameter, betas (0.9, 0.95), weight decay 0.1.",
        "",
        "| run | final eval loss | best eval loss | mean train loss, last 10% | peak max logit | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        s = stats[a.label]
        mark = " **(best)**" if best.get(a.group) == a.label else ""
        lines.append(f"| {a.label}{mark} | {_fmt(s['final_eval_loss'])} | {_fmt(s['best_eval_loss'])} | "
                     f"{_fmt(s['mean_train_loss_last10pct'])} | {_fmt(s['peak_max_logit'], 1)} | "
                     f"{s['seconds']} |")
    if "muonclip" in best and "adamw" in best:
        m, w = stats[best["muonclip"]], stats[best["adamw"]]
        d = m["final_eval_loss"] - w["final_eval_loss"]
        lines += ["", "## Reading",
                  f"- Best MuonClip ({best['muonclip']}): final eval loss {m['final_eval_loss']:.3f}; "
                  f"best AdamW ({best['adamw']}): {w['final_eval_loss']:.3f}; difference "
                  f"{'+' if d >= 0 else ''}{d:.3f} (negative: MuonClip better)."]
        for group, label in best.items():
            lrs = [a.lr for a in arms if a.group == group and a.lr is not None]
            lr = next(a.lr for a in arms if a.label == label)
            if len(lrs) > 1 and lr in (min(lrs), max(lrs)):
                lines.append(f"- {group}'s best lr ({lr:g}) is at the {'top' if lr == max(lrs) else 'bottom'} "
                             "of its sweep: the optimum is not bracketed, a wider sweep may do better.")
    if png:
        lines += ["", f"![muon_vs_adamw]({png.name})"]
    return "\n".join(lines) + "\n"


# -- entry point --------------------------------------------------------------------------------

STUDIES: dict[str, Callable[..., dict[str, Any]]] = {
    "qk_clip": qk_clip_study,
    "muon_vs_adamw": muon_vs_adamw_study,
}


def run_study(name: str, out_dir: str, scale: float = 1.0, overrides: list[str] | None = None,
              num_threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run study `name` (see STUDIES) into `out_dir`; returns its numbers and file paths.

    num_threads: torch CPU threads for the study (restored after; None: leave as is).
    kwargs go to the study (qk_clip: lr, tau; muon_vs_adamw: muon_lrs, adamw_lrs; both:
    preset, echo=None to stay quiet).
    """
    from .errors import ConfigError

    if name not in STUDIES:
        raise ConfigError(f"no study named {name!r}; studies: {', '.join(STUDIES)}")
    if not scale > 0:
        raise ConfigError(f"study scale must be > 0, got {scale}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    try:
        result = STUDIES[name](out, scale, list(overrides or []), **kwargs)
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
