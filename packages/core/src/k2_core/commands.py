"""k2-core's subcommands: plugins, config, params, import-hf, export-hf."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .command import Command


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="tiny", help="preset name or YAML file/URI")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-3")
    p.add_argument("--json", action="store_true", help="print JSON")


def _split_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """`k2 params optim.lr=1` means the default preset with an override."""
    spec, overrides = args.config, list(args.overrides)
    if "=" in spec:
        return "tiny", [spec, *overrides]
    return spec, overrides


# -- k2 plugins ---------------------------------------------------------------------------


def _plugins_run(args: argparse.Namespace) -> int:
    from .plugins import get_plugins

    pl = get_plugins()
    regs = pl.registry.registrations()
    if args.json:
        out = {
            "plugins": [vars(p) for p in [*pl.loaded]],
            "slots": {},
            "failures": [vars(f) for f in pl.failures],
            "skipped": pl.skipped,
        }
        from .registry import SLOTS

        for slot in SLOTS:
            out["slots"][slot] = [
                {
                    "name": r.name,
                    "distribution": r.distribution,
                    "version": r.version,
                    "plugin": r.plugin,
                    "doc": r.doc,
                    "options": r.options.model_json_schema().get("properties", {}),
                }
                for r in regs
                if r.slot == slot
            ]
        print(json.dumps(out, indent=2))
        return 0
    rows = [(r.slot, r.name, r.distribution, r.version, r.doc) for r in regs]
    widths = [
        max(len(str(x[i])) for x in rows + [("slot", "name", "distribution", "version", "")])
        for i in range(4)
    ]
    print(
        "  ".join(
            h.ljust(w)
            for h, w in zip(("SLOT", "NAME", "DISTRIBUTION", "VERSION"), widths, strict=True)
        )
        + "  DESCRIPTION"
    )
    for row in rows:
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )
    print()
    print("plugins: " + ", ".join(f"{p.name} ({p.distribution} {p.version})" for p in pl.loaded))
    if pl.skipped:
        print("skipped by K2_LOAD_PLUGINS: " + ", ".join(pl.skipped))
    for f in pl.failures:
        print(f"FAILED {f.name} ({f.distribution} {f.version}): {f.error}")
    return 0


def plugins_command(*, options: Any) -> Command:
    """List every slot, implementation, distribution and version, and plugins that failed."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON")

    return Command(plugins_command.__doc__ or "", add, _plugins_run)


# -- k2 config show -------------------------------------------------------------------------


def _config_run(args: argparse.Namespace) -> int:
    from .configio import dump_config, load_config, preset_names

    if args.action == "presets":
        print("\n".join(preset_names()))
        return 0
    spec, overrides = _split_overrides(args)
    cfg = load_config(spec, overrides)
    sys.stdout.write(dump_config(cfg, "json" if args.json else "yaml"))
    if args.json:
        print()
    return 0


def config_command(*, options: Any) -> Command:
    """Show a resolved run config (preset or YAML plus dotted overrides), or list presets."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("action", choices=["show", "presets"], help="show a config, or list presets")
        _add_config_args(p)

    return Command(config_command.__doc__ or "", add, _config_run)


# -- k2 params --------------------------------------------------------------------------------


def _human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _params_run(args: argparse.Namespace) -> int:
    from .configio import load_config
    from .params import count_parameters

    spec, overrides = _split_overrides(args)
    cfg = load_config(spec, overrides)
    counts = count_parameters(cfg.model, cfg.moe)
    if args.json:
        print(json.dumps({"config": cfg.name, **counts}, indent=2))
        return 0
    print(
        f"{cfg.name}: {counts['total']:,} total ({_human(counts['total'])}), "
        f"{counts['active']:,} active per token ({_human(counts['active'])})"
    )
    for k, v in counts.items():
        if k not in ("total", "active"):
            print(f"  {k:<22} {v:>20,}")
    return 0


def params_command(*, options: Any) -> Command:
    """Total and per-token active parameters of a config (HF DeepseekV3 layout, exact)."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_config_args(p)

    return Command(params_command.__doc__ or "", add, _params_run)


# -- k2 import-hf / export-hf -------------------------------------------------------------------


def _import_run(args: argparse.Namespace) -> int:
    from .hf import load_pretrained
    from .modelio import save_model

    model = load_pretrained(args.src)
    save_model(model, args.dest)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.src} -> {args.dest} ({n:,} parameters)")
    return 0


def import_command(*, options: Any) -> Command:
    """Import a DeepSeek-V3 / Kimi-K2 Hugging Face checkpoint folder into a k2 checkpoint."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", help="HF folder with config.json and *.safetensors")
        p.add_argument("dest", help="fsspec URI of the k2 checkpoint to write")

    return Command(import_command.__doc__ or "", add, _import_run)


def _export_run(args: argparse.Namespace) -> int:
    from .errors import K2Error
    from .hf import ordinary_permissions, save_pretrained
    from .modelio import load_checkpoint_model
    from .plugins import get_plugins

    model, run_cfg = load_checkpoint_model(args.src)
    save_pretrained(model, args.dest)
    # The tokenizer and chat template come from the plugin that owns tokenizers (k2-data).
    try:
        results = get_plugins().hook.k2_on_export(
            src=args.src, run_config=run_cfg, dest=str(args.dest), tokenizer=args.tokenizer
        )
        extra = sorted({f for r in results for f in (r or [])})
    except K2Error as e:
        if args.tokenizer:
            raise
        extra = []
        print(
            f"k2 export-hf: warning: no tokenizer written ({e}); pass --tokenizer URI",
            file=sys.stderr,
        )
    ordinary_permissions(args.dest, extra)
    with_tok = " with " + ", ".join(extra) if extra else " (weights and config only)"
    print(f"exported {args.src} -> {args.dest}{with_tok}")
    return 0


def export_command(*, options: Any) -> Command:
    """Export a k2 checkpoint as a Hugging Face folder (DeepseekV3ForCausalLM, tokenizer, chat
    template) that transformers, vLLM and SGLang load as it is."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", help="fsspec URI of the k2 checkpoint")
        p.add_argument(
            "dest", help="folder to write config.json, safetensors and the tokenizer into"
        )
        p.add_argument(
            "--tokenizer",
            default=None,
            help="tokenizer folder URI (default: the one the checkpoint was trained with)",
        )

    return Command(export_command.__doc__ or "", add, _export_run)


# -- k2 pretrain / eval-loss ----------------------------------------------------------------


def _pretrain_run(args: argparse.Namespace) -> int:
    import time

    from .configio import load_config
    from .plugins import get_registry

    spec, overrides = _split_overrides(args)
    cfg = load_config(spec, overrides)
    t0 = time.perf_counter()
    summary = get_registry().build("stage", "pretrain")(cfg)
    secs = time.perf_counter() - t0
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps({**summary, "seconds": secs}))
        return 0
    loss = (
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
        if summary["last_loss"] is not None
        else "no steps run (already complete)"
    )
    ev = f" (eval {summary['eval_loss']:.3f})" if summary["eval_loss"] is not None else ""
    tps = f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
    print(
        f"k2 pretrain: {summary['steps']} steps in {secs:.0f}s, {loss}{ev}{tps}; "
        f"run folder {summary['run_dir']}"
        + (f"; mlflow run {summary['tracking_run_id']}" if summary["tracking_run_id"] else "")
    )
    return 0


def pretrain_command(*, options: Any) -> Command:
    """Pre-train a model (default: the tiny preset on the built-in corpus, tracked in mlflow)."""

    def add(p: argparse.ArgumentParser) -> None:
        _add_config_args(p)

    return Command(pretrain_command.__doc__ or "", add, _pretrain_run)


def _eval_loss_run(args: argparse.Namespace) -> int:
    import math

    from .configio import load_config
    from .modelio import load_checkpoint_model
    from .orchestrator import build_dataset, evaluate
    from .plugins import get_plugins

    model, cfg = load_checkpoint_model(args.uri)
    if cfg is None:
        cfg = load_config("tiny")
    if args.data:
        cfg = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(
                    update={"options": {**cfg.data.options, "uri": args.data}}
                )
            }
        )
    val = build_dataset(cfg, get_plugins(), args.split)
    loss = evaluate(model, val, args.batches)
    if args.json:
        print(json.dumps({"loss": loss, "perplexity": math.exp(loss), "batches": args.batches}))
    else:
        print(
            f"{args.uri}: {args.split} loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
            f"({args.batches} batches)"
        )
    return 0


def eval_loss_command(*, options: Any) -> Command:
    """Validation loss and perplexity of a checkpoint on a packed dataset."""

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("uri", help="checkpoint URI (a run's step_N folder or a saved model)")
        p.add_argument("--data", help="packed dataset URI (default: the run's dataset)")
        p.add_argument("--split", default="val", help="dataset split (default: val)")
        p.add_argument("--batches", type=int, default=20, help="batches to average")
        p.add_argument("--json", action="store_true", help="print JSON")

    return Command(eval_loss_command.__doc__ or "", add, _eval_loss_run)


# -- k2 study (deprecated alias of k2 experiment) ---------------------------------------------


def _study_run(args: argparse.Namespace) -> int:
    print(
        "k2: warning: `k2 study` is deprecated and will be removed; use "
        f"`k2 experiment {args.name}` (the same runs)",
        file=sys.stderr,
    )
    argv = [
        args.name,
        *args.overrides,
        "--out",
        args.out or f"runs/study-{args.name}",
        "--scale",
        str(args.scale),
    ]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--json"] if args.json else []
    from .plugins import get_plugins

    registry = get_plugins().registry
    if "experiment" in registry.names("command"):  # k2-rl's `k2 experiment`, found by name
        cmd: Command = registry.build("command", "experiment")
        parser = argparse.ArgumentParser(prog="k2 experiment")
        cmd.add_arguments(parser)
        return int(cmd.run(parser.parse_args(argv)) or 0)
    # no `k2 experiment` installed (k2-core alone): the same studies, run here
    from .harness import print_result
    from .studies import run_study

    r = run_study(
        args.name,
        args.out or f"runs/study-{args.name}",
        scale=args.scale,
        overrides=list(args.overrides),
        num_threads=args.threads,
    )
    return print_result(f"k2 study {args.name}", r, args.json)


def study_command(*, options: Any) -> Command:
    """Deprecated alias of `k2 experiment NAME` for the studies qk_clip and muon_vs_adamw."""

    def add(p: argparse.ArgumentParser) -> None:
        from .harness import add_arguments
        from .studies import STUDIES  # import-light modules: torch loads when a study runs

        add_arguments(p, sorted(STUDIES), default_out="runs/study-NAME")

    return Command(study_command.__doc__ or "", add, _study_run)


CORE_COMMANDS = {
    "study": study_command,
    "pretrain": pretrain_command,
    "eval-loss": eval_loss_command,
    "plugins": plugins_command,
    "config": config_command,
    "params": params_command,
    "import-hf": import_command,
    "export-hf": export_command,
}
