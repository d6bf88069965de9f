"""`k2 experiment NAME`: the K2 report's design experiments at small scale, as tracked runs.

- `sparsity`: more routed experts at fixed active parameters; FLOPs to a common loss;
- `heads`: twice the attention heads; loss gained against inference FLOPs added;
- `rephrase`: raw x10 vs 1 rephrasing x10 vs 10 rephrasings x1, measured by knowledge_qa;
- `qk_clip`, `muon_vs_adamw`: the pre-training studies of k2_core.studies (`k2 study`).

Each runs its arms as ordinary tracked runs nested under one parent mlflow run and writes a
PNG and `report.md` into its output folder, all through k2_core's harness (`k2_core.harness`);
`k2 study NAME` is a deprecated alias of `k2 experiment NAME`. Import-light: the experiment
modules (and torch) load when one runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, function); qk_clip and muon_vs_adamw live in k2_core.studies.
_OWN = {
    "sparsity": ("k2_rl.experiments.sparsity", "sparsity_experiment"),
    "heads": ("k2_rl.experiments.heads", "heads_experiment"),
    "rephrase": ("k2_rl.experiments.rephrase", "rephrase_experiment"),
}
STUDIES = ("qk_clip", "muon_vs_adamw")
EXPERIMENT_NAMES: tuple[str, ...] = (*_OWN, *STUDIES)


def run_experiment(
    name: str,
    out_dir: str,
    config: str = "tiny",
    overrides: list[str] | None = None,
    scale: float = 1.0,
    num_threads: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run experiment `name` on preset/YAML `config` into `out_dir`; returns its numbers and
    file paths (`experiment`, `report`, `png`, `tracking_uri`, `mlflow_experiment`, `arms`, ...).

    kwargs go to the experiment (e.g. `echo=None` to stay quiet; sparsity: experts; heads:
    contexts; rephrase: generator, tokenizer, qa_limit; the studies: their own).
    """
    from k2_core.errors import ConfigError

    if name not in EXPERIMENT_NAMES:
        raise ConfigError(
            f"no experiment named {name!r}; experiments: {', '.join(EXPERIMENT_NAMES)}"
        )
    if not scale > 0:
        raise ConfigError(f"experiment scale must be > 0, got {scale}")
    if name in STUDIES:
        from k2_core.studies import run_study

        r = run_study(
            name,
            out_dir,
            scale=scale,
            overrides=list(overrides or []),
            num_threads=num_threads,
            preset=config,
            **kwargs,
        )
        return {**r, "experiment": name, "mlflow_experiment": r["experiment"]}
    from k2_core.harness import execute

    module, fn = _OWN[name]
    return execute(
        getattr(importlib.import_module(module), fn),
        out_dir,
        scale,
        list(overrides or []),
        num_threads,
        preset=config,
        **kwargs,
    )
