"""`k2 experiment sparsity`: more experts at fixed active parameters (the K2 report's sparsity
study, which found that at equal validation loss sparsity 48 needs 1.69x / 1.39x / 1.15x fewer
FLOPs than sparsity 8 / 16 / 32).

Every arm is the same 2-layer model, both layers MoE, top-k fixed (1 by default, so sparsity =
experts), one shared expert, the same token budget, seed and batches; only the number of routed
experts changes. Active parameters per token are therefore equal (the router's E x hidden
weights aside), and so are the training FLOPs per token. The validation loss is plotted against
training FLOPs; the common loss is the worst arm's best loss (one every arm reaches), and each
arm's FLOPs to reach it are interpolated on its eval curve.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2_core.harness import (
    Arm,
    ParentRun,
    conclude,
    fmt,
    run_arms,
    save_plot,
    scaled_steps,
    series,
    tracking_uri,
)

from .common import (
    EXPERIMENT_MODEL,
    arm_dir,
    base_overrides,
    experiment_name,
    finite,
    first_reach,
)

STEPS = 200
EXPERTS = (8, 16, 32, 48)
TOP_K = 1
SPARSITY_MODEL = ["model.first_k_dense_replace=0", f"moe.num_experts_per_tok={TOP_K}"]
EVALS = 12
EVAL_BATCHES = 8  # 32 sequences: the whole val split of the built-in corpus


def sparsity_experiment(
    out: Path,
    scale: float,
    overrides: list[str],
    preset: str = "tiny",
    experts: tuple[int, ...] = EXPERTS,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Arms at `experts` routed experts, equal active parameters and tokens; FLOPs to a common
    validation loss, and their ratios."""
    from k2_core.configio import load_config
    from k2_core.errors import ConfigError

    from .flops import train_flops_per_token

    if len(experts) < 2 or len(set(experts)) != len(experts):
        raise ConfigError(f"sparsity: experts must be 2 or more distinct counts, got {experts}")
    steps = scaled_steps(STEPS, scale)
    uri = tracking_uri(out, overrides)
    base = [
        *base_overrides("sparsity", steps, uri, evals=EVALS, eval_batches=EVAL_BATCHES),
        *SPARSITY_MODEL,
        *overrides,
    ]
    arms = [
        Arm(
            f"experts={e}",
            [
                *base,
                f"moe.n_routed_experts={e}",
                f"name=sparsity-experts{e}",
                f"checkpoint.dir={arm_dir(out, f'experts={e}')}",
            ],
        )
        for e in sorted(experts)
    ]
    cfgs = {a.label: load_config(preset, a.overrides) for a in arms}  # bad overrides fail here
    parent = ParentRun(
        uri,
        experiment_name("sparsity"),
        out,
        "sparsity",
        {
            "scale": scale,
            "steps": steps,
            "experts": list(experts),
            "preset": preset,
            "overrides": " ".join([*SPARSITY_MODEL, *overrides]),
        },
    )
    status = "FAILED"
    try:
        status = run_arms(arms, parent, preset, echo)
    finally:
        rows = {}
        for a in arms:
            if not a.history:
                continue
            c = cfgs[a.label]
            fpt = train_flops_per_token(c.model, c.moe, c.data.seq_len)
            steps_x, losses = series(a, "eval/loss")
            rows[a.label] = {
                "experts": c.moe.n_routed_experts,
                "top_k": c.moe.num_experts_per_tok,
                "sparsity": c.moe.n_routed_experts / c.moe.num_experts_per_tok,
                "train_flops_per_token": fpt,
                "flops": [s * a.tokens_per_step * fpt for s in steps_x],
                "eval_loss": losses,
                "final_eval_loss": losses[-1] if losses else None,
                "best_eval_loss": min(losses) if losses else None,
                "seconds": round(a.seconds, 1),
                "mlflow_run_id": a.summary.get("tracking_run_id"),
            }
        summary = summarize_sparsity(rows)
        png, report = conclude(
            out,
            parent,
            status,
            _metrics(rows, summary),
            plot=lambda: _plot(out / "sparsity.png", rows, summary),
            report=lambda png: _report(rows, summary, steps, arms, preset, overrides, png),
        )
    return {
        "experiment": "sparsity",
        "out_dir": str(out),
        "png": str(png) if png else None,
        "report": str(report),
        "tracking_uri": uri,
        "mlflow_experiment": experiment_name("sparsity"),
        "parent_run_id": parent.run_id,
        "steps": steps,
        "tokens_per_run": steps * arms[0].tokens_per_step,
        **summary,
        "arms": {
            k: {x: v for x, v in r.items() if x not in ("flops", "eval_loss")}
            for k, r in rows.items()
        },
    }


def summarize_sparsity(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The common loss, each arm's FLOPs to reach it, and the FLOPs ratios (vs the least and
    the most sparse arm)."""
    best = [r["best_eval_loss"] for r in rows.values() if r["best_eval_loss"] is not None]
    if not best:
        return {
            "common_loss": None,
            "flops_to_common_loss": {},
            "ratio_vs_least_sparse": {},
            "most_sparse_advantage": {},
        }
    target = max(best)
    reach = {k: first_reach(r["flops"], r["eval_loss"], target) for k, r in rows.items()}
    by_sparsity = sorted(rows, key=lambda k: rows[k]["sparsity"])
    least, most = by_sparsity[0], by_sparsity[-1]
    ratio = {k: reach[least] / f for k, f in reach.items() if f and reach[least]}
    # The report's form: how many times more FLOPs each sparsity needs than the sparsest one.
    adv = {k: f / reach[most] for k, f in reach.items() if f and reach[most] and k != most}
    return {
        "common_loss": target,
        "flops_to_common_loss": reach,
        "ratio_vs_least_sparse": ratio,
        "most_sparse_advantage": adv,
        "least_sparse": least,
        "most_sparse": most,
    }


def _metrics(rows: dict[str, dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    m: dict[str, float] = {}
    for k, r in rows.items():
        tag = k.replace("=", "")
        m.update({f"{tag}/{x}": v for x, v in finite(r).items()})
        f = summary["flops_to_common_loss"].get(k)
        if f:
            m[f"{tag}/flops_to_common_loss"] = f
        if k in summary["most_sparse_advantage"]:
            m[f"{tag}/flops_vs_most_sparse"] = summary["most_sparse_advantage"][k]
    if summary["common_loss"] is not None:
        m["common_loss"] = summary["common_loss"]
    return m


def _plot(path: Path, rows: dict[str, dict[str, Any]], summary: dict[str, Any]) -> Path | None:
    def draw(plt: Any, a1: Any, a2: Any) -> None:
        cmap = plt.get_cmap("viridis")
        keys = sorted(rows, key=lambda k: rows[k]["sparsity"])
        for i, k in enumerate(keys):
            r = rows[k]
            a1.plot(
                r["flops"],
                r["eval_loss"],
                "o-",
                ms=3,
                color=cmap(0.85 * i / max(1, len(keys) - 1)),
                label=f"{k} (sparsity {r['sparsity']:g})",
            )
        if summary["common_loss"] is not None:
            a1.axhline(
                summary["common_loss"],
                ls="--",
                color="gray",
                label=f"common loss {summary['common_loss']:.3f}",
            )
        a1.set(xlabel="training FLOPs", ylabel="validation loss", title="validation loss vs FLOPs")
        reach = summary["flops_to_common_loss"]
        xs = [rows[k]["sparsity"] for k in keys if reach.get(k)]
        ys = [reach[k] for k in keys if reach.get(k)]
        a2.bar(
            [str(int(x)) if float(x).is_integer() else f"{x:g}" for x in xs], ys, color="tab:blue"
        )
        for i, k in enumerate(k for k in keys if reach.get(k)):
            adv = summary["most_sparse_advantage"].get(k)
            a2.annotate(f"{adv:.2f}x" if adv else "1x", (i, ys[i]), ha="center", va="bottom")
        a2.set(
            xlabel="sparsity (experts / top-k)",
            ylabel="FLOPs to reach the common loss",
            title="FLOPs to the common loss (x: vs the sparsest)",
        )
        a1.legend()

    return save_plot(path, draw)


def _report(
    rows: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    steps: int,
    arms: list[Arm],
    preset: str,
    overrides: list[str],
    png: Path | None,
) -> str:
    tps = arms[0].tokens_per_step
    reach = summary["flops_to_common_loss"]
    lines = [
        "# Experiment: sparsity",
        "",
        f"`{preset}` with {' '.join([*EXPERIMENT_MODEL, *SPARSITY_MODEL])}"
        f"{' ' + ' '.join(overrides) if overrides else ''}; {steps} steps x {tps} tokens = "
        f"{steps * tps:,} tokens per arm, same seed, init scheme and batches. Only the number of "
        "routed experts changes; training FLOPs per token are equal across arms up to the router.",
        "",
        "| arm | sparsity | train FLOPs / token | final eval loss | best eval loss "
        "| FLOPs to common loss | x vs sparsest | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(rows, key=lambda k: rows[k]["sparsity"]):
        r = rows[k]
        f = reach.get(k)
        adv = summary["most_sparse_advantage"].get(
            k, 1.0 if k == summary.get("most_sparse") else None
        )
        lines.append(
            f"| {k} | {r['sparsity']:g} | {r['train_flops_per_token']:.3g} | "
            f"{fmt(r['final_eval_loss'])} | {fmt(r['best_eval_loss'])} | "
            f"{f'{f:.3g}' if f else '-'} | {fmt(adv, 2)} | {r['seconds']} |"
        )
    lines += ["", "## Reading"]
    if summary["common_loss"] is not None:
        most = summary["most_sparse"]
        lines.append(f"- Common loss (the worst arm's best): {summary['common_loss']:.3f}.")
        adv = summary["most_sparse_advantage"]
        if adv:
            parts = ", ".join(
                f"{adv[k]:.2f}x ({k})" for k in sorted(adv, key=lambda k: rows[k]["sparsity"])
            )
            lines.append(
                f"- FLOPs each arm needs to reach it, relative to the sparsest ({most}): "
                f"{parts}. The K2 report: 1.69x / 1.39x / 1.15x for sparsity 8 / 16 / 32 "
                "against 48."
            )
        finals = {
            k: r["final_eval_loss"] for k, r in rows.items() if r["final_eval_loss"] is not None
        }
        if finals:
            lo, hi = min(finals, key=finals.get), max(finals, key=finals.get)
            lines.append(
                f"- Final eval loss from {finals[lo]:.3f} ({lo}) to {finals[hi]:.3f} ({hi})."
            )
        lines.append(
            "- One seed, a small model and a short run: differences of a few hundredths "
            "in loss are within run-to-run noise at this scale."
        )
    if png:
        lines += ["", f"![sparsity]({png.name})"]
    return "\n".join(lines) + "\n"


__all__ = ["EXPERTS", "sparsity_experiment", "summarize_sparsity"]
