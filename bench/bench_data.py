"""Data preparation benchmark: `k2_data.prepare` (2 worker processes) vs a plain loop.

Both read the same JSON Lines files with the same trained byte-level BPE tokenizer; the plain
loop calls the HF tokenizer's `encode` once per document in one process (no packing, no
writing), `prepare` reads, dedups, tokenizes in workers and packs into zarr. Prints both
throughputs (tokens/s) and the ratio, and the CPU seconds of each side (prepare: its own
process plus its workers): on a shared machine the wall-clock ratio drops when another job
holds a core, while `2 x plain CPU / prepare CPU` bounds what 2 free cores would give.
Run: `uv run python bench/bench_data.py [--mb 24]`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import shutil
import tempfile
import time


def make_corpus(folder: str, mb: float, files: int = 4, seed: int = 0) -> None:
    """Zipf-distributed words with punctuation and digits, ~`mb` MB of text in `files` files."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(20000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    per_file = int(mb * 1e6 / files)
    for f in range(files):
        with open(os.path.join(folder, f"part-{f}.jsonl"), "w") as out:
            size, i = 0, 0
            while size < per_file:
                n = rng.randint(50, 800)
                words = rng.choices(vocab, weights, k=n)
                for j in range(0, n, rng.randint(8, 20)):
                    words[j] = words[j].capitalize() + rng.choice([",", ".", " 1984", "'s", ";"])
                text = " ".join(words)
                line = json.dumps({"id": f"{f}-{i}", "text": text}) + "\n"
                out.write(line)
                size += len(line)
                i += 1


def baseline(pattern: str, tok_json: str) -> tuple[int, float]:
    """Single process: read each file, `encode` each document once."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_json)
    t0 = time.perf_counter()
    n = 0
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                ids = tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
                n += len(ids)
    return n, time.perf_counter() - t0


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of JSON Lines")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()

    from k2_data.config import load_prepare_config
    from k2_data.prepare import prepare, read_manifest, train_tokenizer

    tmp = tempfile.mkdtemp(prefix="k2-bench-data-")
    try:
        make_corpus(tmp, args.mb)
        pattern = os.path.join(tmp, "*.jsonl")
        base = {
            "sources": [{"uri": pattern, "domain": "web"}],
            "seq_len": 1024,
            "tokenizer": {"name": "bpe", "options": {"vocab_size": args.vocab}},
            "tokenizer_sample_docs": 2000,
        }
        tok_dir = os.path.join(tmp, "tok")
        train_tokenizer(load_prepare_config(base), tok_dir)
        tok_json = os.path.join(tok_dir, "tokenizer.json")

        c0 = time.process_time()
        n_base, t_base = baseline(pattern, tok_json)
        c_base = time.process_time() - c0
        cfg = load_prepare_config(
            {
                **base,
                "tokenizer": {"name": "bpe", "options": {"path": tok_json}},
                "workers": args.workers,
                "out": os.path.join(tmp, "out"),
            }
        )
        c0, k0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        uri = prepare(cfg)
        t_prep = time.perf_counter() - t0
        c_main = _cpu(resource.RUSAGE_SELF) - c0
        c_workers = _cpu(resource.RUSAGE_CHILDREN) - k0  # workers are reaped when prepare ends
        m = read_manifest(uri)
        n_prep = sum(s["n_tokens"] + s["dropped_tail_tokens"] for s in m["splits"].values())
        n_prep -= m["documents"]["train"] + m["documents"]["val"]  # EOS separators
        r_base, r_prep = n_base / t_base, n_prep / t_prep
        print(f"corpus: {args.mb:.0f} MB JSON Lines, {n_base:,} tokens, {os.cpu_count()} CPUs")
        print(
            f"plain loop (1 process, encode per document): {r_base:>12,.0f} tokens/s "
            f"({t_base:.2f}s)"
        )
        print(
            f"k2 data prepare ({args.workers} workers, packed to zarr): "
            f"{r_prep:>12,.0f} tokens/s ({t_prep:.2f}s)"
        )
        print(f"ratio: {r_prep / r_base:.2f}x")
        k = max(1, min(args.workers, os.cpu_count() or 1))
        print(
            f"cpu: plain loop {c_base:.2f}s; prepare {c_main + c_workers:.2f}s (main {c_main:.2f}s "
            f"+ workers {c_workers:.2f}s); bound with {k} free cores "
            f"{k * c_base / (c_main + c_workers):.2f}x"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
