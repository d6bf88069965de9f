"""Small, reproducible training studies on CPU: ordinary tracked runs compared side by side.

Each study trains a few arms of the same config through the orchestrator (`build_run` /
`train`), logs them as runs of one mlflow experiment `study-<name>` nested under a parent run,
and writes `<name>.png` and `report.md` into its output folder: the experiment harness of
`k2_core.harness`, which k2-rl's `k2 experiment` shares (it runs these two as well).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import (
    Arm,
    ParentRun,
    cadence,
    conclude,
    execute,
    fmt,
    run_arms,
    save_plot,
    scaled_steps,
    series,
    tracking_uri,
)

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


def _common(name: str, out: Path, steps: int, warmup: int, uri: str) -> list[str]:
    log_every, eval_every = cadence(steps)
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


def _stats(arm: Arm) -> dict[str, Any]:
    _, ml = series(arm, "attn/max_logit")
    _, tl = series(arm, "train/loss")
    _, el = series(arm, "eval/loss")
    _, hc = series(arm, "qk_clip/heads_clipped")
    tail = tl[-max(1, len(tl) // 10) :]  # last ~10% of logged steps: single batches are noisy
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


# -- qk_clip ----------------------------------------------------------------------------------


def qk_clip_study(
    out: Path,
    scale: float,
    overrides: list[str],
    preset: str = "tiny",
    lr: float = QK_CLIP_LR,
    tau: float = QK_CLIP_TAU,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Plain Muon vs MuonClip(tau) at an aggressive lr: max logit and loss per step."""
    steps = scaled_steps(QK_CLIP_STEPS, scale)
    uri = tracking_uri(out, overrides)
    base = [
        *_common("qk_clip", out, steps, max(1, round(20 * scale)), uri),
        f"optim.lr={lr}",
        *overrides,
    ]
    arms = [
        Arm(
            "muon",
            [
                *base,
                "optim.name=muon",
                "name=qk_clip-muon",
                f"checkpoint.dir={out / 'runs' / 'muon'}",
            ],
        ),
        Arm(
            "muonclip",
            [
                *base,
                "optim.name=muonclip",
                "optim.options.qk_clip=true",
                f"optim.options.qk_clip_tau={tau}",
                "name=qk_clip-muonclip",
                f"checkpoint.dir={out / 'runs' / 'muonclip'}",
            ],
        ),
    ]
    parent = ParentRun(
        uri,
        "study-qk_clip",
        out,
        "qk_clip",
        {
            "scale": scale,
            "steps": steps,
            "lr": lr,
            "tau": tau,
            "preset": preset,
            "overrides": " ".join([*STUDY_MODEL, *overrides]),
        },
    )
    status = "FAILED"
    try:
        status = run_arms(arms, parent, preset, echo)
    finally:
        stats = {a.label: _stats(a) for a in arms if a.history}
        png, report = conclude(
            out,
            parent,
            status,
            {f"{a}/{k}": v for a, s in stats.items() for k, v in s.items() if isinstance(v, float)},
            plot=lambda: _plot_qk_clip(out / "qk_clip.png", arms, tau),
            report=lambda png: _report_qk_clip(arms, stats, steps, lr, tau, preset, overrides, png),
        )
    return {
        "study": "qk_clip",
        "out_dir": str(out),
        "png": str(png) if png else None,
        "report": str(report),
        "tracking_uri": uri,
        "experiment": "study-qk_clip",
        "parent_run_id": parent.run_id,
        "steps": steps,
        "lr": lr,
        "tau": tau,
        "arms": stats,
    }


def _plot_qk_clip(path: Path, arms: list[Arm], tau: float) -> Path | None:
    def draw(plt: Any, a1: Any, a2: Any) -> None:
        colors = {"muon": "tab:red", "muonclip": "tab:blue"}
        for arm in arms:
            c = colors.get(arm.label)
            a1.plot(*series(arm, "attn/max_logit"), label=arm.label, color=c)
            a2.plot(*series(arm, "train/loss"), label=f"{arm.label} train", color=c, alpha=0.45)
            a2.plot(*series(arm, "eval/loss"), "o-", label=f"{arm.label} eval", color=c)
        a1.axhline(tau, ls="--", color="gray", label=f"tau = {tau:g}")
        a1.set(
            xlabel="step",
            ylabel="max attention logit (pre-clip)",
            yscale="log",
            title="max attention logit",
        )
        a2.set(xlabel="step", ylabel="loss", title="train / eval loss")
        a1.legend()
        a2.legend()

    return save_plot(path, draw)


def _report_qk_clip(
    arms: list[Arm],
    stats: dict[str, Any],
    steps: int,
    lr: float,
    tau: float,
    preset: str,
    overrides: list[str],
    png: Path | None,
) -> str:
    m, c = stats["muon"], stats["muonclip"]
    lines = [
        "# Study: qk_clip",
        "",
        f"`{preset}` with {' '.join(STUDY_MODEL)}{' ' + ' '.join(overrides) if overrides else ''}; "
        f"{steps} steps, lr {lr:g} (WSD), seed identical for both runs (same init and batches).",
        f"Arms: plain Muon (`optim.name=muon`) vs MuonClip (`optim.name=muonclip`, "
        f"qk_clip_tau={tau:g}). Max logit = pre-clip max over heads and layers of each "
        "logged step.",
        "",
        "| run | peak max logit | final max logit | peak / tau | max heads clipped "
        "| final train loss | mean train loss, last 10% | final eval loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        s = stats[a.label]
        ratio = s["peak_max_logit"] / tau if s["peak_max_logit"] is not None else None
        lines.append(
            f"| {a.label} | {fmt(s['peak_max_logit'], 1)} | {fmt(s['final_max_logit'], 1)} | "
            f"{fmt(ratio, 2)} | {fmt(s['max_heads_clipped'], 0)} | {fmt(s['final_train_loss'])} | "
            f"{fmt(s['mean_train_loss_last10pct'])} | {fmt(s['final_eval_loss'])} | "
            f"{s['seconds']} |"
        )
    lines += ["", "## Reading"]
    if m["peak_max_logit"] is not None and c["peak_max_logit"] is not None:
        lines.append(
            f"- Muon's max logit peaked at {m['peak_max_logit']:.1f} "
            f"({m['peak_max_logit'] / tau:.1f}x "
            f"tau) and ended at {m['final_max_logit']:.1f}; MuonClip's peaked at "
            f"{c['peak_max_logit']:.1f} ({c['peak_max_logit'] / tau:.2f}x tau) and ended at "
            f"{c['final_max_logit']:.1f}."
        )
    if m["final_eval_loss"] is not None and c["final_eval_loss"] is not None:
        d = c["final_eval_loss"] - m["final_eval_loss"]
        lines.append(
            f"- Final eval loss: Muon {m['final_eval_loss']:.3f}, MuonClip "
            f"{c['final_eval_loss']:.3f} (MuonClip {'+' if d >= 0 else ''}{d:.3f})."
        )
    if png:
        lines += ["", f"![qk_clip]({png.name})"]
    return "\n".join(lines) + "\n"


# -- muon_vs_adamw ------------------------------------------------------------------------------


def muon_vs_adamw_study(
    out: Path,
    scale: float,
    overrides: list[str],
    preset: str = "tiny",
    muon_lrs: tuple[float, ...] = MUON_LRS,
    adamw_lrs: tuple[float, ...] = ADAMW_LRS,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """MuonClip vs AdamW at equal tokens (same steps, batch, data order), a small lr sweep for
    each; validation loss vs step."""
    steps = scaled_steps(MUON_VS_ADAMW_STEPS, scale)
    uri = tracking_uri(out, overrides)
    base = [*_common("muon_vs_adamw", out, steps, max(1, round(20 * scale)), uri), *overrides]
    arms = [
        Arm(
            f"muonclip lr={lr:g}",
            [
                *base,
                "optim.name=muonclip",
                f"optim.lr={lr}",
                f"name=muon_vs_adamw-muonclip-{lr:g}",
                f"checkpoint.dir={out / 'runs' / f'muonclip-{lr:g}'}",
            ],
            group="muonclip",
            lr=lr,
        )
        for lr in muon_lrs
    ]
    arms += [
        Arm(
            f"adamw lr={lr:g}",
            [
                *base,
                "optim.name=adamw",
                f"optim.lr={lr}",
                f"name=muon_vs_adamw-adamw-{lr:g}",
                f"checkpoint.dir={out / 'runs' / f'adamw-{lr:g}'}",
            ],
            group="adamw",
            lr=lr,
        )
        for lr in adamw_lrs
    ]
    parent = ParentRun(
        uri,
        "study-muon_vs_adamw",
        out,
        "muon_vs_adamw",
        {
            "scale": scale,
            "steps": steps,
            "muon_lrs": list(muon_lrs),
            "adamw_lrs": list(adamw_lrs),
            "preset": preset,
            "overrides": " ".join([*STUDY_MODEL, *overrides]),
        },
    )
    status = "FAILED"
    try:
        status = run_arms(arms, parent, preset, echo)
    finally:
        stats = {a.label: _stats(a) for a in arms if a.history}
        best = _best(arms, stats)
        png, report = conclude(
            out,
            parent,
            status,
            {
                f"{a.replace(' ', '_').replace('=', '')}/{k}": v
                for a, s in stats.items()
                for k, v in s.items()
                if isinstance(v, float)
            },
            plot=lambda: _plot_muon_vs_adamw(out / "muon_vs_adamw.png", arms, best),
            report=lambda png: _report_muon_vs_adamw(
                arms, stats, best, steps, preset, overrides, png
            ),
        )
    tokens = steps * arms[0].tokens_per_step
    return {
        "study": "muon_vs_adamw",
        "out_dir": str(out),
        "png": str(png) if png else None,
        "report": str(report),
        "tracking_uri": uri,
        "experiment": "study-muon_vs_adamw",
        "parent_run_id": parent.run_id,
        "steps": steps,
        "tokens_per_run": tokens,
        "best": best,
        "arms": stats,
    }


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
    def draw(plt: Any, a1: Any, a2: Any) -> None:
        styles = {"muonclip": ("tab:blue", a1), "adamw": ("tab:orange", a2)}
        shades = ["-", "--", ":", "-."]
        for i_group, group in enumerate(("muonclip", "adamw")):
            color, ax = styles[group]
            for i, arm in enumerate(a for a in arms if a.group == group):
                lw = 2.5 if best.get(group) == arm.label else 1.2
                ax.plot(
                    *series(arm, "eval/loss"),
                    shades[i % len(shades)],
                    marker="o",
                    ms=3,
                    color=color,
                    lw=lw,
                    label=arm.label + (" (best)" if lw > 2 else ""),
                )
            # the other optimizer's best, in grey, for a side-by-side reading
            other = best.get(("adamw", "muonclip")[i_group])
            for arm in arms:
                if arm.label == other:
                    ax.plot(
                        *series(arm, "eval/loss"),
                        color="gray",
                        alpha=0.6,
                        lw=1.5,
                        label=f"{arm.label} (best of the other)",
                    )
            ax.set(xlabel="step (equal tokens per step)", title=f"{group}: validation loss")
            ax.legend()
        a1.set_ylabel("eval loss")

    return save_plot(path, draw, sharey=True)


def _report_muon_vs_adamw(
    arms: list[Arm],
    stats: dict[str, Any],
    best: dict[str, str],
    steps: int,
    preset: str,
    overrides: list[str],
    png: Path | None,
) -> str:
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
        "| run | final eval loss | best eval loss | mean train loss, last 10% | peak max logit "
        "| seconds |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        s = stats[a.label]
        mark = " **(best)**" if best.get(a.group) == a.label else ""
        lines.append(
            f"| {a.label}{mark} | {fmt(s['final_eval_loss'])} | {fmt(s['best_eval_loss'])} | "
            f"{fmt(s['mean_train_loss_last10pct'])} | {fmt(s['peak_max_logit'], 1)} | "
            f"{s['seconds']} |"
        )
    if "muonclip" in best and "adamw" in best:
        m, w = stats[best["muonclip"]], stats[best["adamw"]]
        d = m["final_eval_loss"] - w["final_eval_loss"]
        lines += [
            "",
            "## Reading",
            f"- Best MuonClip ({best['muonclip']}): final eval loss {m['final_eval_loss']:.3f}; "
            f"best AdamW ({best['adamw']}): {w['final_eval_loss']:.3f}; difference "
            f"{'+' if d >= 0 else ''}{d:.3f} (negative: MuonClip better).",
        ]
        for group, label in best.items():
            lrs = [a.lr for a in arms if a.group == group and a.lr is not None]
            lr = next(a.lr for a in arms if a.label == label)
            if len(lrs) > 1 and lr in (min(lrs), max(lrs)):
                lines.append(
                    f"- {group}'s best lr ({lr:g}) is at the "
                    f"{'top' if lr == max(lrs) else 'bottom'} "
                    "of its sweep: the optimum is not bracketed, a wider sweep may do better."
                )
    if png:
        lines += ["", f"![muon_vs_adamw]({png.name})"]
    return "\n".join(lines) + "\n"


# -- entry point --------------------------------------------------------------------------------

STUDIES: dict[str, Callable[..., dict[str, Any]]] = {
    "qk_clip": qk_clip_study,
    "muon_vs_adamw": muon_vs_adamw_study,
}


def run_study(
    name: str,
    out_dir: str,
    scale: float = 1.0,
    overrides: list[str] | None = None,
    num_threads: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
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
    return execute(STUDIES[name], out_dir, scale, list(overrides or []), num_threads, **kwargs)
