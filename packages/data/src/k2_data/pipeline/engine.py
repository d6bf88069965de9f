"""The synthesis pipeline engine: items -> shards -> a processor per item -> committed records.

A `Stage` says what the items are (`items()`), what decides the outputs (`identity()`), and
builds a `Processor` (an async callable item -> `ItemResult`) in whichever process runs it.
Each item ends accepted (records out), rejected (a reason, e.g. `unfaithful`) or failed (an
error kind, e.g. `timeout`); failed items stay pending, so a rerun retries just those. Shards
commit through `ShardStore` exactly once; the local executor runs items under one asyncio
semaphore, the Ray executor runs one task per shard; both write the same records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from k2_core.errors import ConfigError, K2Error, PluginError

from .options import PipelineOptions
from .progress import PipelineProgress
from .store import ShardStore


@dataclass
class ItemResult:
    """What became of one item: output records, or the reason it was rejected."""

    records: list[dict[str, Any]] = field(default_factory=list)
    rejected: str | None = None


class Processor(Protocol):
    """Turns one input item into an ItemResult; raising means failed (by `error_kind`)."""

    async def __call__(self, item: dict[str, Any]) -> ItemResult:
        """Process one item."""
        ...

    def stats(self) -> dict[str, int]:
        """Generator usage so far (requests, retries, tokens)."""
        ...

    async def aclose(self) -> None:
        """Release the generator(s)."""
        ...


class Stage(Protocol):
    """One kind of synthesis work (rephrase, tool-use trajectories, ...)."""

    name: str

    def identity(self) -> dict[str, Any]:
        """The settings that decide the outputs (hashed into the plan)."""
        ...

    def items(self) -> Iterable[dict[str, Any]]:
        """Input items, each a JSON-able dict with a unique `id`."""
        ...

    def make_processor(self) -> Processor:
        """A processor for this process (called inside each executor worker)."""
        ...


def error_kind(exc: BaseException) -> str:
    """The failure kind of an exception: a generator's `error_kind`, else `internal`."""
    kind = getattr(exc, "error_kind", None)
    if isinstance(kind, str):
        return kind
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "internal"


def config_hash(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's identity, 12 hex digits."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class RunSummary:
    """Totals of a run folder after a (possibly partial) run."""

    out: str
    n_items: int
    accepted: int
    records: int
    rejected: dict[str, int]
    failed: dict[str, int]  # items still pending, by the kind of their last failure
    complete: bool
    seconds: float
    items_this_run: int
    usage: dict[str, int]
    sample: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # first failure messages of this run

    def line(self) -> str:
        """A one-line summary for the terminal."""
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        fail = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        state = "complete" if self.complete else "incomplete (rerun to retry the failed)"
        rate = self.items_this_run / self.seconds if self.seconds > 0 else 0.0
        first = f" (first error: {self.errors[0]})" if self.failed and self.errors else ""
        return (
            f"{self.out}: {state}; {self.n_items} items, {self.records} records accepted; "
            f"rejected: {rej}; failed: {fail}{first}; {rate:.1f} items/s this run"
        )


def _pending(items: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = {i for m in attempts for i in m["done_ids"]}
    return [it for it in items if str(it["id"]) not in done]


async def process_shard(
    store: ShardStore,
    shard: int,
    attempt: int,
    items: list[dict[str, Any]],
    processor: Processor,
    sem: asyncio.Semaphore,
    on_item: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `items` (the shard's pending ones) and commit them as one attempt; its manifest."""
    errors: list[str] = []

    async def one(it: dict[str, Any]) -> tuple[str, Any]:
        async with sem:
            try:
                res = await processor(it)
            except K2Error:
                raise
            except Exception as e:
                kind = error_kind(e)
                if len(errors) < 5:  # a few messages per attempt, for the manifest
                    errors.append(f"{type(e).__name__}: {e}"[:500])
                out: tuple[str, Any] = ("failed", kind)
            else:
                out = ("rejected", res.rejected) if res.rejected else ("accepted", res.records)
        if on_item is not None:
            on_item(out[0])
        return out

    results = await asyncio.gather(*(one(it) for it in items))
    records: list[dict[str, Any]] = []
    done_ids: list[str] = []
    failed_kinds: dict[str, str] = {}
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for it, (outcome, val) in zip(items, results, strict=True):
        iid = str(it["id"])
        if outcome == "failed":
            failed[val] += 1
            failed_kinds[iid] = val
            continue
        done_ids.append(iid)
        if outcome == "rejected":
            rejected[val] += 1
        else:
            for k, r in enumerate(val):
                r.setdefault("id", iid if len(val) == 1 else f"{iid}/{k}")
                records.append(r)
    manifest = {
        "done_ids": done_ids,
        "failed_ids": list(failed_kinds),
        "failed_kinds": failed_kinds,
        "accepted": len(done_ids) - sum(rejected.values()),
        "rejected": dict(rejected),
        "failed": dict(failed),
        "errors": errors,
    }
    await asyncio.to_thread(store.commit, shard, attempt, records, manifest)
    return {**manifest, "n_records": len(records), "sample": records[:5]}


def _shard_worker(
    out: str,
    fmt: str,
    shard: int,
    attempt: int,
    items: list[dict[str, Any]],
    stage: Stage,
    concurrency: int,
) -> dict[str, Any]:
    """One shard's pending items in a fresh event loop (a Ray task); its manifest plus the
    generator usage."""
    store = ShardStore(out, fmt)

    async def go() -> dict[str, Any]:
        proc = stage.make_processor()
        try:
            m = await process_shard(
                store, shard, attempt, items, proc, asyncio.Semaphore(concurrency)
            )
            return {**m, "usage": dict(proc.stats())}
        finally:
            await proc.aclose()

    return asyncio.run(go())


class _Tally:
    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def __call__(self, outcome: str) -> None:
        self.c[outcome] += 1


def _plan(store: ShardStore, stage: Stage, opts: PipelineOptions) -> dict[str, Any]:
    identity = stage.identity()
    h = config_hash(identity)
    plan = store.read_plan()
    if plan is None:
        return store.write_plan(stage.items(), opts.shard_size, identity, h)
    if plan["config_hash"] != h:
        raise ConfigError(
            f"out {opts.out}: holds a run of another config (hash "
            f"{plan['config_hash']}, this one {h}); choose another out"
        )
    if plan.get("output_format", "jsonl") != opts.format:
        raise ConfigError(
            f"out {opts.out}: was written as {plan['output_format']}; "
            f"keep format={plan['output_format']} or choose another out"
        )
    return plan


async def _run_local(
    store: ShardStore,
    todo: list[tuple[int, int, list[dict[str, Any]]]],
    stage: Stage,
    opts: PipelineOptions,
    prog: PipelineProgress,
    tally: _Tally,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    proc = stage.make_processor()
    sem = asyncio.Semaphore(opts.concurrency)
    # Enough shards open to keep `concurrency` items busy, few enough that shards commit
    # steadily (a kill loses at most the open ones).
    open_shards = asyncio.Semaphore(max(2, -(-2 * opts.concurrency // opts.shard_size)))

    def on_item(outcome: str) -> None:
        tally(outcome)
        prog.update(1, tally.c["accepted"], tally.c["rejected"], tally.c["failed"])

    async def one(shard: int, attempt: int, items: list[dict[str, Any]]) -> dict[str, Any]:
        async with open_shards:
            return await process_shard(store, shard, attempt, items, proc, sem, on_item)

    try:
        ms = await asyncio.gather(*(one(*t) for t in todo))
    finally:
        await proc.aclose()
    return list(ms), dict(proc.stats())


def _run_ray(
    store: ShardStore,
    todo: list[tuple[int, int, list[dict[str, Any]]]],
    stage: Stage,
    opts: PipelineOptions,
    prog: PipelineProgress,
    tally: _Tally,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    import ray

    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if opts.ray_address:
            kw["address"] = opts.ray_address
        elif opts.ray_num_cpus:
            kw["num_cpus"] = opts.ray_num_cpus
        try:
            ray.init(**kw)
        except Exception as e:  # e.g. a raylet that gave up waiting for its agents
            raise PluginError(
                f"pipeline.executor ray: could not start Ray ({e}); see "
                "/tmp/ray/session_latest/logs/raylet.out, or use executor local"
            ) from None
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_shard_worker)
        refs = [
            task.remote(store.out, store.fmt, s, a, items, stage, opts.concurrency)
            for s, a, items in todo
        ]
        ms: list[dict[str, Any]] = []
        usage: Counter[str] = Counter()
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for m in ray.get(ready):
                ms.append(m)
                usage.update(m.pop("usage", {}))
                n_rej, n_fail = sum(m["rejected"].values()), sum(m["failed"].values())
                tally.c.update({"accepted": m["accepted"], "rejected": n_rej, "failed": n_fail})
                prog.update(
                    m["accepted"] + n_rej + n_fail,
                    tally.c["accepted"],
                    tally.c["rejected"],
                    tally.c["failed"],
                )
        return ms, dict(usage)
    finally:
        if started:
            ray.shutdown()


def summarize(store: ShardStore, plan: dict[str, Any]) -> dict[str, Any]:
    """Totals over the committed attempts of a run folder."""
    committed = store.committed()
    accepted = records = 0
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    settled = 0
    for shard in range(plan["n_shards"]):
        ms = committed.get(shard, [])
        for m in ms:
            accepted += m["accepted"]
            records += m["n_records"]
            rejected.update(m["rejected"])
            settled += len(m["done_ids"])
        if ms:  # ids still failed after the latest attempt of the shard
            last = max(ms, key=lambda m: m["attempt"])
            done = {i for m in ms for i in m["done_ids"]}
            kinds = last.get("failed_kinds", {})
            failed.update(kinds[i] for i in last["failed_ids"] if i not in done and i in kinds)
    return {
        "n_items": plan["n_items"],
        "accepted": accepted,
        "records": records,
        "rejected": dict(rejected),
        "failed": dict(failed),
        "complete": settled == plan["n_items"],
    }


def _tracking_uri(opts: PipelineOptions, store: ShardStore) -> str | None:
    if opts.tracking_uri:
        return opts.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "file" in (
        store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    ):
        return "sqlite:///" + os.path.abspath(os.path.join(store.root, "mlflow.db"))
    return None


def _track(store: ShardStore, stage: Stage, opts: PipelineOptions, summary: RunSummary) -> None:
    from k2_core.tracking import MLflowOptions, MLflowTracker, flatten

    uri = _tracking_uri(opts, store)
    if uri is None:
        print(
            f"k2: note: no mlflow run for a non-local out ({opts.out}); set tracking_uri",
            file=sys.stderr,
        )
        return
    run_dir = store.root if uri.startswith("sqlite:") else tempfile.mkdtemp(prefix="k2-synth-")
    tr = MLflowTracker(
        tracking_uri=uri,
        experiment=opts.experiment,
        run_dir=run_dir,
        options=MLflowOptions(system_metrics=False),
    )
    cfg = {"stage": stage.name, **stage.identity(), "pipeline": opts.model_dump(mode="json")}
    tr.start(
        run_name=f"{stage.name}-{os.path.basename(store.root.rstrip('/'))}",
        params=flatten(cfg),
        config=cfg,
    )
    metrics: dict[str, float] = {
        "items": summary.n_items,
        "accepted": summary.accepted,
        "records": summary.records,
        "rejected": sum(summary.rejected.values()),
        "failed": sum(summary.failed.values()),
        "complete": float(summary.complete),
        "items_this_run": summary.items_this_run,
        "items_per_s": summary.items_this_run / max(summary.seconds, 1e-9),
    }
    metrics.update({f"rejected/{k}": v for k, v in summary.rejected.items()})
    metrics.update({f"failed/{k}": v for k, v in summary.failed.items()})
    metrics.update({f"usage/{k}": v for k, v in summary.usage.items()})
    tr.log_metrics(metrics, step=0)
    tr.flush()
    if tr.run_id is not None:
        tr.client.log_dict(tr.run_id, {"records": summary.sample}, "samples.json")
    tr.end("FINISHED" if summary.complete else "FAILED")


def run_pipeline(stage: Stage, opts: PipelineOptions) -> RunSummary:
    """Plan (once), run every pending item, commit per shard; resumable and idempotent."""
    t0 = time.perf_counter()
    store = ShardStore(opts.out, opts.format)
    plan = _plan(store, stage, opts)
    store.clean_tmp()
    committed = store.committed()
    todo: list[tuple[int, int, list[dict[str, Any]]]] = []
    settled = 0
    for shard in range(plan["n_shards"]):
        ms = committed.get(shard, [])
        items = store.read_inputs(shard)
        pend = _pending(items, ms)
        settled += len(items) - len(pend)
        if pend:
            todo.append((shard, 1 + max((m["attempt"] for m in ms), default=-1), pend))
    tally = _Tally()
    with PipelineProgress(stage.name, plan["n_items"], settled, opts.progress) as prog:
        if not todo:
            ms, usage = [], {}
        elif opts.executor == "ray":
            ms, usage = _run_ray(store, todo, stage, opts, prog, tally)
        else:
            ms, usage = asyncio.run(_run_local(store, todo, stage, opts, prog, tally))
    tot = summarize(store, plan)
    sample = [r for m in ms for r in m.get("sample", [])][: opts.sample_size]
    summary = RunSummary(
        out=opts.out,
        n_items=tot["n_items"],
        accepted=tot["accepted"],
        records=tot["records"],
        rejected=tot["rejected"],
        failed=tot["failed"],
        complete=tot["complete"],
        seconds=time.perf_counter() - t0,
        items_this_run=sum(len(t[2]) for t in todo),
        usage=usage,
        sample=sample,
        errors=[e for m in ms for e in m.get("errors", [])][:5],
    )
    if summary.complete:
        store.write_done(
            {k: v for k, v in summary.__dict__.items() if k not in ("sample", "errors")}
        )
    if opts.tracking:
        _track(store, stage, opts, summary)
    return summary
