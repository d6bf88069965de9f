"""`k2 data`: prepare, tokenizer train, stats, inspect."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from k2_core.command import Command


def _split_spec(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`k2 data prepare seq_len=512` means the default config with an override."""
    spec, overrides = args.config, list(args.overrides)
    if spec is not None and "=" in spec and "://" not in spec.split("=", 1)[0]:
        return None, [spec, *overrides]
    return spec, overrides


def _prepare_run(args: argparse.Namespace) -> int:
    from .config import load_prepare_config
    from .prepare import prepare_or_reuse, read_manifest

    spec, overrides = _split_spec(args)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_prepare_config(spec, overrides)
    t0 = time.perf_counter()
    uri, built = prepare_or_reuse(cfg)
    if not built:  # complete already, or built meanwhile by another process of the job
        print(f"dataset ready (reused): {uri}")
        return 0
    m = read_manifest(uri)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"dataset ready: {uri} ({time.perf_counter() - t0:.1f}s)")
    print(
        f"  train {tr['n_sequences']:,} sequences ({tr['n_tokens']:,} tokens), "
        f"val {va['n_sequences']:,} sequences; {m['duplicates']:,} duplicates dropped"
    )
    if m["skipped"]:
        print(
            f"  skipped {sum(m['skipped'].values()):,}: "
            + ", ".join(f"{k} {v:,}" for k, v in m["skipped"].items())
            + (
                f" (which and why: {uri.rstrip('/')}/{m['skip_log']['path']})"
                if m.get("skip_log")
                else ""
            )
        )
    return 0


def _tokenizer_run(args: argparse.Namespace) -> int:
    from .config import load_prepare_config, output_uri
    from .prepare import train_tokenizer

    spec, overrides = _split_spec(args)
    cfg = load_prepare_config(spec, overrides)
    out = args.out or f"{output_uri(cfg)}-tokenizer"
    tok = train_tokenizer(cfg, out)
    print(f"tokenizer {tok.name} ({tok.vocab_size:,} ids, sha256 {tok.content_hash[:12]}) -> {out}")
    return 0


def _skip_lines(m: dict[str, Any], log: list[dict[str, Any]], examples: int = 3) -> list[str]:
    """Skips by reason, each with its first files/records from the skip log."""
    lines = []
    for reason, n in m["skipped"].items():
        where = []
        for e in (e for e in log if e.get("reason") == reason):
            if len(where) == examples:
                where.append("...")
                break
            name = e["file"].rsplit("/", 1)[-1]
            rec = f" {e['record']}" if e.get("record") else ""
            why = f" ({e['detail']})" if e.get("detail") else ""
            where.append(f"{name}{rec}{why}")
        lines.append(f"    {reason:<14} {n:>10,}" + (f"  {'; '.join(where)}" if where else ""))
    return lines


def _stats_run(args: argparse.Namespace) -> int:
    from .prepare import read_manifest, read_skip_log

    m = read_manifest(args.uri)
    keys = (
        "seq_len",
        "vocab_size",
        "tokenizer",
        "splits",
        "tokens_per_domain",
        "documents",
        "duplicates",
        "skipped",
        "weights",
        "sources",
    )
    info = {k: m[k] for k in keys}
    info["tokenizer"] = {k: m["tokenizer"][k] for k in ("name", "content_hash")}
    log = read_skip_log(args.uri, m)
    info["skipped_total"] = sum(m["skipped"].values())
    info["skip_log"] = log
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{args.uri}: seq_len {m['seq_len']}, vocab {m['vocab_size']:,}, tokenizer "
        f"{m['tokenizer']['name']} ({m['tokenizer']['content_hash'][:12]})"
    )
    for split, s in m["splits"].items():
        print(
            f"  {split:<5} {s['n_sequences']:>10,} sequences {s['n_tokens']:>14,} tokens "
            f"{s['n_documents']:>9,} documents"
        )
    total = sum(m["tokens_per_domain"].values()) or 1
    for dom, n in m["tokens_per_domain"].items():
        print(f"  domain {dom:<12} {n:>14,} tokens ({100 * n / total:.1f}%)")
    print(f"  documents {m['documents']}, duplicates {m['duplicates']:,}")
    total = sum(m["skipped"].values())
    if not total:
        print("  skipped: none")
        return 0
    print(f"  skipped {total:,} (by reason, with the first files/records):")
    for line in _skip_lines(m, log):
        print(line)
    if m.get("skip_log"):
        more = m["skip_log"].get("not_logged", 0)
        print(
            f"  skip log: {args.uri.rstrip('/')}/{m['skip_log']['path']}"
            + (f" ({more:,} more skips not logged)" if more else "")
        )
    return 0


def _inspect_run(args: argparse.Namespace) -> int:
    from .prepare import inspect_dataset

    marker = "\u2016"
    for i, text in enumerate(inspect_dataset(args.uri, args.n, args.split, marker=marker)):
        print(f"--- {args.split}[{i}] ({marker} marks a document start) ---")
        print(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    action = args.data_action
    if action is None:
        args._data_parser.print_help()
        return 2
    return {
        "prepare": _prepare_run,
        "tokenizer": _tokenizer_run,
        "stats": _stats_run,
        "inspect": _inspect_run,
    }[action](args)


def data_command(*, options: Any) -> Command:
    """Prepare, inspect and summarise packed pre-training datasets."""

    def add(p: argparse.ArgumentParser) -> None:
        p.set_defaults(_data_parser=p)
        sub = p.add_subparsers(dest="data_action", metavar="ACTION", parser_class=type(p))

        pp = sub.add_parser(
            "prepare",
            help="tokenize and pack sources into a zarr dataset "
            "(no CONFIG: the built-in corpus, cached)",
        )
        pp.add_argument("config", nargs="?", default=None, help="YAML file/URI (optional)")
        pp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seq_len=512")
        pp.add_argument("--out", default=None, help="output URI (default: the cache folder)")

        pt = sub.add_parser("tokenizer", help="tokenizer tools")
        tsub = pt.add_subparsers(
            dest="tokenizer_action", metavar="ACTION", parser_class=type(p), required=True
        )
        tt = tsub.add_parser(
            "train", help="train the config's tokenizer on a sample of its sources"
        )
        tt.add_argument("config", help="YAML file/URI")
        tt.add_argument("overrides", nargs="*", help="dotted overrides")
        tt.add_argument("--out", default=None, help="folder URI to save the tokenizer into")

        ps = sub.add_parser("stats", help="tokens per domain, sequences, documents, skips")
        ps.add_argument("uri", help="packed dataset URI")
        ps.add_argument("--json", action="store_true", help="print JSON")

        pi = sub.add_parser("inspect", help="decoded sequences with document starts marked")
        pi.add_argument("uri", help="packed dataset URI")
        pi.add_argument("--n", type=int, default=3, help="number of sequences")
        pi.add_argument("--split", default="train", choices=["train", "val"], help="split")

    return Command(data_command.__doc__ or "", add, _run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
