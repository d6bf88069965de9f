"""The on-disk layout of a synthesis run over fsspec, and its exactly-once commits.

```
OUT/plan.json                       written last when planning: config hash, shard count
OUT/_inputs/shard-00000.jsonl       the input items of each shard (frozen at plan time)
OUT/_manifests/shard-00000-a00.json one per committed attempt: ids done, counts by outcome
OUT/data/part-00000-a00.jsonl       the output records of that attempt (or .parquet)
OUT/_tmp/...                        attempts in progress; never read, removed on start
OUT/done.json                       totals, once every item is accepted or rejected
```

An attempt commits by: records -> `_tmp`, manifest written, then the data file renamed into
`data/`. The rename is the commit point: a data file is visible only complete and with its
manifest, so a reader globbing `data/*` never sees a partial shard, and a killed run's
uncommitted attempt is simply redone (same name, replaced) — nothing lost, nothing doubled.
"""

from __future__ import annotations

import io
import json
from typing import Any

from k2_core.errors import ConfigError


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)


class ShardStore:
    """Reads and writes one run folder (any fsspec URI)."""

    def __init__(self, out: str, fmt: str = "jsonl"):
        self.out = out.rstrip("/")
        self.fmt = fmt
        self.fs, self.root = _fs(self.out)

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri(self, *parts: str) -> str:
        """The full URI of a path inside the run folder."""
        return self.fs.unstrip_protocol(self._p(*parts))

    def _write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def _read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    # -- the plan ------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        """plan.json, or None before planning finished."""
        path = self._p("plan.json")
        return self._read_json(path) if self.fs.exists(path) else None

    def write_plan(
        self, items: Any, shard_size: int, identity: dict[str, Any], config_hash: str
    ) -> dict[str, Any]:
        """Freeze the input items into shards; plan.json last. Duplicate ids are a ConfigError."""
        seen: set[str] = set()
        shard: list[dict[str, Any]] = []
        n_shards = n_items = 0

        def flush() -> None:
            nonlocal n_shards, shard
            blob = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in shard)
            self._write(self._p("_inputs", f"shard-{n_shards:05d}.jsonl"), blob.encode())
            n_shards, shard = n_shards + 1, []

        for it in items:
            iid = str(it["id"])
            if iid in seen:
                raise ConfigError(f"input item id {iid!r} appears twice; ids must be unique")
            seen.add(iid)
            shard.append(it)
            n_items += 1
            if len(shard) == shard_size:
                flush()
        if shard:
            flush()
        plan = {
            "format": "k2-synth-run",
            "version": 1,
            "config_hash": config_hash,
            "n_shards": n_shards,
            "n_items": n_items,
            "shard_size": shard_size,
            "output_format": self.fmt,
            "config": identity,
        }
        self._write(self._p("plan.json"), json.dumps(plan, indent=1).encode())
        return plan

    def read_inputs(self, shard: int) -> list[dict[str, Any]]:
        """The frozen input items of `shard`."""
        with self.fs.open(self._p("_inputs", f"shard-{shard:05d}.jsonl"), "rb") as f:
            return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line]

    # -- commits -------------------------------------------------------------------------
    def data_name(self, shard: int, attempt: int) -> str:
        """The file name of an attempt's records."""
        return f"part-{shard:05d}-a{attempt:02d}.{self.fmt}"

    def committed(self) -> dict[int, list[dict[str, Any]]]:
        """Manifests of every committed attempt (its data file exists), by shard."""
        mdir, ddir = self._p("_manifests"), self._p("data")
        if not self.fs.exists(mdir):
            return {}
        have = (
            {p.rsplit("/", 1)[-1] for p in self.fs.ls(ddir, detail=False)}
            if self.fs.exists(ddir)
            else set()
        )
        out: dict[int, list[dict[str, Any]]] = {}
        for path in sorted(self.fs.ls(mdir, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if not (name.startswith("shard-") and name.endswith(".json")):
                continue
            shard, attempt = int(name[6:11]), int(name[13:15])
            if self.data_name(shard, attempt) not in have:
                continue  # killed between manifest and rename: not committed
            out.setdefault(shard, []).append(self._read_json(path))
        return out

    def commit(
        self, shard: int, attempt: int, records: list[dict[str, Any]], manifest: dict[str, Any]
    ) -> None:
        """Write `records` and their manifest so that they become visible at once, or never."""
        name = self.data_name(shard, attempt)
        tmp = self._p("_tmp", name + ".tmp")
        self._write(tmp, self._encode(records))
        manifest = {
            **manifest,
            "shard": shard,
            "attempt": attempt,
            "file": f"data/{name}",
            "n_records": len(records),
        }
        self._write(
            self._p("_manifests", f"shard-{shard:05d}-a{attempt:02d}.json"),
            json.dumps(manifest).encode(),
        )
        self.fs.makedirs(self._p("data"), exist_ok=True)
        self.fs.mv(tmp, self._p("data", name))

    def _encode(self, records: list[dict[str, Any]]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Nested provenance goes in as JSON text columns: one flat schema for every shard.
        rows = [
            {
                k: (json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v)
                for k, v in r.items()
            }
            for r in records
        ]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()

    def clean_tmp(self) -> None:
        """Drop what a killed run left in `_tmp`."""
        if self.fs.exists(self._p("_tmp")):
            self.fs.rm(self._p("_tmp"), recursive=True)

    def write_done(self, summary: dict[str, Any]) -> None:
        """done.json: every item is settled."""
        self.write_json("done.json", summary)

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file at the top of the run folder (e.g. agents.json)."""
        self._write(self._p(name), json.dumps(obj, indent=1, ensure_ascii=False).encode())

    def read_records(self) -> list[dict[str, Any]]:
        """Every committed output record (data files in name order)."""
        ddir = self._p("data")
        if not self.fs.exists(ddir):
            return []
        out: list[dict[str, Any]] = []
        for path in sorted(self.fs.ls(ddir, detail=False)):
            if path.endswith(".jsonl"):
                with self.fs.open(path, "rb") as f:
                    out += [json.loads(x) for x in f.read().decode("utf-8").splitlines() if x]
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                with self.fs.open(path, "rb") as f:
                    out += pq.read_table(f).to_pylist()
        return out


def read_outputs(out: str) -> list[dict[str, Any]]:
    """Every committed record of the run at `out` (jsonl or parquet)."""
    return ShardStore(out).read_records()
