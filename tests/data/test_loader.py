"""k2_data.loader.PackedDataset: shuffle, sharding, exact resume, re-sharding, doc masks,
threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
import zarr
from k2_core.errors import ConfigError, K2Error
from k2_data.loader import PackedDataset, PackedOptions, build_packed, make_loader
from k2data_testutil import counting_fs

SEQ = 16


def write_manifest(
    path,
    seq_len: int = SEQ,
    *,
    version: int = 2,
    complete: bool = True,
    vocab: int = 1000,
    eos: int = 0,
) -> None:
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "k2-packed",
                "version": version,
                "complete": complete,
                "seq_len": seq_len,
                "eos_id": eos,
                "vocab_size": vocab,
            }
        )
    )


def write_store(
    path,
    n_seq: int = 40,
    seq_len: int = SEQ,
    *,
    seed: int = 0,
    complete: bool = True,
    manifest: bool = True,
    chunk_rows: int = 8,
    vocab: int = 1000,
    eos: int = 0,
    splits=("train", "val"),
    version: int = 2,
    compressed: bool = False,
) -> dict:
    """A packed store in the on-disk contract (version 1: no row_docs; `compressed`: zstd chunks,
    which only zarr can read). Documents of random length end with `eos`; returns
    {split: (tokens, doc_starts)}."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w")
    codec = {} if compressed else {"compressors": None}
    out = {}
    for k, split in enumerate(splits):
        n = n_seq if k == 0 else max(1, n_seq // 4)
        total = n * (seq_len + 1)
        stream = rng.integers(1, vocab, size=total, dtype=np.uint32)
        starts, pos = [], 0
        while pos < total:
            starts.append(pos)
            length = int(rng.integers(3, 2 * seq_len))
            if pos + length - 1 < total:
                stream[pos + length - 1] = eos
            pos += length
        tokens = stream.reshape(n, seq_len + 1)
        doc_starts = np.asarray(starts, dtype=np.int64)
        g = root.create_group(split)
        t = g.create_array(
            "tokens", shape=tokens.shape, dtype="uint32", chunks=(chunk_rows, seq_len + 1), **codec
        )
        t[...] = tokens
        d = g.create_array(
            "doc_starts", shape=doc_starts.shape, dtype="int64", chunks=(7,), **codec
        )
        d[...] = doc_starts
        if version >= 2:
            row_docs = np.searchsorted(doc_starts, np.arange(n + 1) * (seq_len + 1), side="left")
            g.create_array("row_docs", shape=row_docs.shape, dtype="int64", chunks=(5,), **codec)[
                ...
            ] = row_docs
        out[split] = (tokens, doc_starts)
    if manifest:
        write_manifest(path, seq_len, version=version, complete=complete, vocab=vocab, eos=eos)
    return out


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "packed"
    data = write_store(path)
    return str(path), data


def opts(uri, **kw) -> PackedOptions:
    kw.setdefault("batch_size", 4)
    return PackedOptions(uri=uri, **kw)


def take(loader, k):
    return [next(loader) for _ in range(k)]


def row_ids(batch, tokens):
    """Which stored rows a batch holds (matched on full content)."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    index = {tokens[i].tobytes(): i for i in range(len(tokens))}
    return [index[r.astype(np.uint32).tobytes()] for r in full]


def test_batch_shapes_and_shift(store):
    uri, data = store
    with PackedDataset(opts(uri)) as ds:
        b = next(ds)
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].shape == (4, SEQ) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
        tokens = data["train"][0]
        for i, r in enumerate(row_ids(b, tokens)):
            assert np.array_equal(b["input_ids"][i].numpy(), tokens[r, :-1])
            assert np.array_equal(b["labels"][i].numpy(), tokens[r, 1:])
        assert ds.steps_per_epoch == 10 and ds.seq_len == SEQ


@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume(store, prefetch):
    uri, _ = store
    o = opts(uri, prefetch=prefetch, doc_mask=True)
    with PackedDataset(o) as ref:
        full = take(ref, 25)  # crosses two epoch boundaries (10 steps each)
    for k in (0, 7, 10, 13):
        with PackedDataset(o) as a:
            take(a, k)
            state = json.loads(json.dumps(a.state_dict()))
        assert state["epoch"] * 40 + state["position"] == 4 * k
        with PackedDataset(o) as b:
            b.load_state_dict(state)
            rest = take(b, 25 - k)
        for x, y in zip(full[k:], rest, strict=True):
            assert all(torch.equal(x[key], y[key]) for key in x)


def test_state_counts_consumed_not_prefetched(store):
    uri, _ = store
    with PackedDataset(opts(uri, prefetch=6)) as ds:
        take(ds, 2)
        deadline = threading.Event()
        deadline.wait(0.2)  # let the thread run ahead
        assert ds.state_dict()["position"] == 8


def test_seed_determinism_and_shuffle(store):
    uri, data = store
    tokens = data["train"][0]

    def epoch_rows(**kw):
        with PackedDataset(opts(uri, **kw)) as ds:
            return [r for b in take(ds, 10) for r in row_ids(b, tokens)]

    a, b, c = epoch_rows(seed=1), epoch_rows(seed=1), epoch_rows(seed=2)
    assert a == b and a != c
    assert sorted(a) == list(range(40)) and a != list(range(40))
    assert epoch_rows(shuffle=False) == list(range(40))
    with PackedDataset(opts(uri, seed=1)) as ds:  # another epoch, another order
        e0 = [r for bt in take(ds, 10) for r in row_ids(bt, tokens)]
        e1 = [r for bt in take(ds, 10) for r in row_ids(bt, tokens)]
    assert sorted(e1) == sorted(e0) and e1 != e0


def rank_rows(uri, tokens, world_size, steps, state=None, **kw):
    per_rank = []
    for r in range(world_size):
        with make_loader(opts(uri, **kw), rank=r, world_size=world_size) as ds:
            if state is not None:
                ds.load_state_dict(state)
            per_rank.append([row_ids(b, tokens) for b in take(ds, steps)])
    return per_rank


def test_each_sequence_once_per_epoch_across_ranks(tmp_path):
    path = tmp_path / "p"
    tokens = write_store(path, n_seq=30)["train"][0]  # 30 = 3 global batches of 8 + ragged 6
    per_rank = rank_rows(str(path), tokens, 2, 3)
    seen = [r for rank in per_rank for b in rank for r in b]
    assert len(seen) == 24 == len(set(seen))
    # global batch t = rank 0's rows then rank 1's rows, in permutation order
    with PackedDataset(opts(str(path), batch_size=8)) as single:
        for t, b in enumerate(take(single, 3)):
            assert row_ids(b, tokens) == per_rank[0][t] + per_rank[1][t]


def test_drop_last_false_covers_every_sequence(tmp_path):
    path = tmp_path / "p"
    tokens = write_store(path, n_seq=30)["train"][0]
    per_rank = rank_rows(str(path), tokens, 2, 4, drop_last=False)
    seen = sorted(r for rank in per_rank for b in rank for r in b)
    assert seen == list(range(30))
    assert [len(per_rank[0][3]), len(per_rank[1][3])] == [3, 3]


@pytest.mark.parametrize(("ws_from", "ws_to"), [(2, 1), (1, 2), (2, 4)])
def test_reshard_no_loss_no_repeat(tmp_path, ws_from, ws_to):
    path = tmp_path / "p"
    tokens = write_store(path, n_seq=48)["train"][0]
    uri = str(path)
    with make_loader(opts(uri), rank=0, world_size=ws_from) as first:
        before = take(first, 2)  # 2 global batches of ws_from * 4
        state = first.state_dict()
    before_rows = []
    for r in range(ws_from):
        with make_loader(opts(uri), rank=r, world_size=ws_from) as ds:
            before_rows += [x for b in take(ds, 2) for x in row_ids(b, tokens)]
    assert [x for b in before for x in row_ids(b, tokens)] == before_rows[:8]
    consumed = 2 * ws_from * 4
    steps_left = (48 - consumed) // (ws_to * 4)
    after = rank_rows(uri, tokens, ws_to, steps_left, state=state)
    after_rows = [x for rank in after for b in rank for x in b]
    assert sorted(before_rows + after_rows) == list(range(48))
    # the re-sharded run continues the same permutation
    with PackedDataset(opts(uri, batch_size=48, prefetch=0)) as whole:
        perm = row_ids(next(whole), tokens)
    assert sorted(after_rows) == sorted(perm[consumed:])


def test_reshard_refused_when_position_does_not_divide(store):
    uri, _ = store
    with make_loader(opts(uri), rank=0, world_size=1) as ds:
        take(ds, 1)  # position 4
        state = ds.state_dict()
    with make_loader(opts(uri), rank=0, world_size=2) as ds2:  # global batch 8
        with pytest.raises(ConfigError, match=r"world size 2.*world size 1"):
            ds2.load_state_dict(state)


def test_state_for_another_dataset_refused(store, tmp_path):
    uri, _ = store
    other = tmp_path / "other"
    write_store(other, n_seq=44)
    with PackedDataset(opts(uri)) as ds:
        state = ds.state_dict()
    with PackedDataset(opts(str(other))) as ds2, pytest.raises(ConfigError, match="44"):
        ds2.load_state_dict(state)


def test_seed_comes_from_state(store):
    uri, _ = store
    with PackedDataset(opts(uri, seed=5)) as a:
        take(a, 3)
        state = a.state_dict()
        want = take(a, 2)
    with PackedDataset(opts(uri, seed=9)) as b:
        b.load_state_dict(state)
        got = take(b, 2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(want, got, strict=True))


def test_doc_mask_segments_and_positions(store):
    uri, data = store
    tokens, starts = data["train"]
    L = SEQ
    with PackedDataset(opts(uri, doc_mask=True, batch_size=40, prefetch=0)) as ds:
        b = next(ds)
    assert set(b) == {"input_ids", "labels", "segment_ids", "position_ids"}
    for i, row in enumerate(row_ids(b, tokens)):
        seg, pos = b["segment_ids"][i].tolist(), b["position_ids"][i].tolist()
        base = row * (L + 1)
        begins = [
            s - base for s in starts if base < s < base + L
        ]  # documents starting inside the row
        want_seg, want_pos, cur, last = [], [], 0, 0
        for t in range(L):
            if t in begins:
                cur, last = cur + 1, t
            want_seg.append(cur)
            want_pos.append(t - last)
        assert seg == want_seg and pos == want_pos
        assert seg[0] == 0 and pos[0] == 0
    with PackedDataset(opts(uri, doc_mask=True, position_ids=False)) as ds:
        assert set(next(ds)) == {"input_ids", "labels", "segment_ids"}


def test_segment_ids_feed_the_model_mask(store):
    """The decoder masks attention across segment_ids: documents in one row do not see each
    other."""
    uri, _ = store
    with PackedDataset(opts(uri, doc_mask=True, prefetch=0)) as ds:
        b = next(ds)
    seg = b["segment_ids"]
    mask = seg[:, :, None] == seg[:, None, :]
    assert mask.shape == (4, SEQ, SEQ) and bool(mask.diagonal(dim1=1, dim2=2).all())


def test_out_of_core_reads_match_in_memory(store):
    uri, _ = store
    with (
        PackedDataset(opts(uri, doc_mask=True, in_memory_max_mb=1)) as mem,
        PackedDataset(opts(uri, doc_mask=True)) as disk,
    ):
        assert mem.in_memory and not disk.in_memory
        for x, y in zip(take(mem, 12), take(disk, 12), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    with PackedDataset(opts(uri, shuffle=False, in_memory_max_mb=0)) as seq:
        assert next(seq)["input_ids"].shape == (4, SEQ)


def test_val_split(store):
    uri, data = store
    with PackedDataset(opts(uri, split="val", batch_size=2)) as ds:
        assert ds.n_sequences == 10
        rows = row_ids(next(ds), data["val"][0])
        assert len(rows) == 2


@pytest.mark.parametrize("case", ["no_manifest", "incomplete"])
def test_incomplete_store_refused(tmp_path, case):
    path = tmp_path / "p"
    write_store(path, manifest=case != "no_manifest", complete=False)
    with pytest.raises(K2Error) as err:
        PackedDataset(opts(str(path)))
    msg = str(err.value)
    assert "\n" not in msg and ("manifest.json missing" in msg or "incomplete" in msg)


def test_bad_requests_refused(store, tmp_path):
    uri, _ = store
    with pytest.raises(ConfigError, match="no split 'test'"):
        PackedDataset(opts(uri, split="test"))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        PackedDataset(opts(uri, batch_size=41))
    with pytest.raises(ConfigError, match="rank"):
        PackedDataset(opts(uri), rank=2, world_size=2)
    with pytest.raises(ConfigError, match="seq_len 8"):
        path = tmp_path / "bad"
        write_store(path)
        write_manifest(path, 8)
        PackedDataset(opts(str(path)))


def test_options_are_strict():
    with pytest.raises(ValueError):
        PackedOptions(batch_sz=3)
    with pytest.raises(ValueError):
        PackedOptions(batch_size=0)
    o = PackedOptions()
    with pytest.raises(ValueError):
        o.batch_size = 3  # frozen


def test_factories(store):
    uri, _ = store
    with build_packed(options=opts(uri), rank=1, world_size=2) as ds:
        assert ds.rank == 1 and ds.world_size == 2 and ds.global_batch_size == 8


def test_build_packed_takes_the_run_arguments(store):
    """The orchestrator passes split, batch_size, seq_len, seed, rank and world_size."""
    uri, _ = store
    run = dict(batch_size=2, seq_len=SEQ, seed=7, rank=0, world_size=1)
    with build_packed(options=PackedOptions(uri=uri), split="val", **run) as ds:
        assert ds.options.split == "val" and ds.options.batch_size == 2 and ds.options.seed == 7
    with build_packed(options=PackedOptions(uri=uri, seed=3), split="train", **run) as ds:
        assert ds.options.seed == 3  # the dataset's own seed wins over train.seed
    with pytest.raises(ConfigError, match="micro batch size"):
        build_packed(options=PackedOptions(uri=uri, batch_size=4), split="train", **run)
    with pytest.raises(ConfigError, match="seq_len 16.*data.seq_len is 32"):
        build_packed(options=PackedOptions(uri=uri), split="train", **{**run, "seq_len": 32})


def test_default_uri_is_lazy(monkeypatch, store):
    """uri=None asks k2_data.prepare.default_dataset_uri() (only when needed)."""
    import types

    uri, _ = store
    fake = types.ModuleType("k2_data.prepare")
    fake.default_dataset_uri = lambda: uri
    monkeypatch.setitem(sys.modules, "k2_data.prepare", fake)
    with PackedDataset(PackedOptions(batch_size=4)) as ds:
        assert ds.uri == uri


def test_memory_uri(tmp_path):
    """Any fsspec URI: an in-memory store works like a local one."""
    import fsspec

    local = tmp_path / "p"
    write_store(local)
    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/k2-loader-test", recursive=True)
    try:
        with PackedDataset(opts("memory://k2-loader-test", in_memory_max_mb=0)) as ds:
            assert next(ds)["input_ids"].shape == (4, SEQ)
    finally:
        fs.rm("/k2-loader-test", recursive=True)


def test_prefetch_thread_stops_on_close(store):
    uri, _ = store
    ds = PackedDataset(opts(uri, prefetch=2))
    take(ds, 3)
    thread = ds._prefetcher.thread
    assert thread.is_alive()
    ds.close()
    assert not thread.is_alive()
    take(ds, 1)  # iteration restarts it
    thread = ds._prefetcher.thread
    del ds
    import gc

    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_no_hang_at_exit(store):
    """A process that leaves a prefetching loader open still exits promptly."""
    uri, _ = store
    code = textwrap.dedent(f"""
        from k2_data.loader import PackedDataset, PackedOptions
        ds = PackedDataset(PackedOptions(uri={uri!r}, batch_size=4, prefetch=2))
        keep = iter(ds)
        next(keep); next(keep)
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


# --- scaling: keyed shuffle, range reads, read amplification, start-up memory, old layouts -----


def test_keyed_permutation_is_a_pinned_bijection():
    from k2_data.loader import KeyedPermutation

    for n in (1, 2, 3, 5, 40, 1000, 65_537):
        assert sorted(KeyedPermutation(n, 5, 1)(np.arange(n)).tolist()) == list(range(n))
    # integer arithmetic only: these values are the same on every process and platform
    assert KeyedPermutation(1000, 0, 0)(np.arange(8)).tolist() == [
        497,
        231,
        819,
        635,
        847,
        307,
        993,
        637,
    ]
    big = KeyedPermutation(10**12, 3, 7)(np.arange(4)).tolist()
    assert big == [268977067344, 62763126504, 990991567250, 582336211324]
    base = KeyedPermutation(1000, 0, 0)(np.arange(1000))
    assert not np.array_equal(base, KeyedPermutation(1000, 1, 0)(np.arange(1000)))
    assert not np.array_equal(base, KeyedPermutation(1000, 0, 1)(np.arange(1000)))
    assert np.array_equal(base[600:700], KeyedPermutation(1000, 0, 0)(np.arange(600, 700)))


def test_read_amplification_of_a_shuffled_epoch(tmp_path):
    """Bytes read from the store / bytes of the rows asked for, over a shuffled epoch of 1,024 rows,
    document index included: at most 2x (row byte ranges: about 1x)."""
    seq_len, n = 64, 1024
    write_store(tmp_path / "p", n_seq=n, seq_len=seq_len, chunk_rows=256)
    counting = counting_fs()
    o = opts(
        f"k2count://{tmp_path / 'p'}", batch_size=8, doc_mask=True, prefetch=0, in_memory_max_mb=0
    )
    with PackedDataset(o) as ds:
        assert not ds.in_memory
        counting.read = 0
        rows = [next(ds)["input_ids"].shape[0] for _ in range(ds.steps_per_epoch)]
        assert ds.bytes_read == counting.read  # the loader's own count agrees with the store's
    asked = sum(rows) * (seq_len + 1) * 4
    assert sum(rows) == n
    amplification = counting.read / asked
    assert amplification <= 2.0
    assert amplification < 1.2, amplification  # tokens exactly, plus a few index bytes per row
    # the same epoch from local files (os.pread) reads the same bytes
    with PackedDataset(
        opts(str(tmp_path / "p"), batch_size=8, doc_mask=True, prefetch=0, in_memory_max_mb=0)
    ) as local:
        for _ in range(local.steps_per_epoch):
            next(local)
        assert local.bytes_read == counting.read


def test_start_up_memory_does_not_grow_with_the_corpus(tmp_path):
    """Opening a 2M-row split and reading a batch allocates about what a 1k-row split does."""
    import tracemalloc

    def build(path, n):
        root = zarr.open_group(str(path), mode="w")
        g = root.create_group("train")
        rows = 1 << 16
        t = g.create_array(
            "tokens", shape=(n, 9), dtype="uint32", chunks=(rows, 9), compressors=None
        )
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            t[lo:hi] = np.arange(lo * 9, hi * 9, dtype=np.uint32).reshape(-1, 9) % 997 + 1
        starts = np.arange(0, n * 9, 7, dtype=np.int64)  # a document every 7 tokens
        g.create_array(
            "doc_starts", shape=starts.shape, dtype="int64", chunks=(1 << 20,), compressors=None
        )[...] = starts
        row_docs = np.searchsorted(starts, np.arange(n + 1) * 9, side="left")
        g.create_array(
            "row_docs", shape=row_docs.shape, dtype="int64", chunks=(1 << 20,), compressors=None
        )[...] = row_docs
        write_manifest(path, 8)

    def peak(path):
        tracemalloc.start()
        try:
            with PackedDataset(
                opts(str(path), batch_size=8, doc_mask=True, prefetch=0, in_memory_max_mb=0)
            ) as ds:
                b = next(ds)
            return tracemalloc.get_traced_memory()[1], b
        finally:
            tracemalloc.stop()

    n = 2_000_000
    build(tmp_path / "small", 1000)
    build(tmp_path / "big", n)
    peak(tmp_path / "small")  # imports and caches first
    small, _ = peak(tmp_path / "small")
    big, b = peak(tmp_path / "big")
    assert b["input_ids"].shape == (8, 8) and b["segment_ids"].shape == (8, 8)
    assert big < n, (big, small)  # an O(n) int64 array alone would be 16 MB
    assert big < small + 256 * 1024, (big, small)


def test_old_layouts_still_read(tmp_path):
    """A version-1 store (no row_docs) and a compressed one (zarr decodes it) give the same
    batches."""
    write_store(tmp_path / "v2")
    write_store(tmp_path / "v1", version=1)
    write_store(tmp_path / "zstd", compressed=True)
    o = dict(doc_mask=True, in_memory_max_mb=0, prefetch=0)
    with PackedDataset(opts(str(tmp_path / "v2"), **o)) as ds:
        want = take(ds, 12)
    with pytest.warns(UserWarning, match=r"k2 data prepare --out"):
        v1 = PackedDataset(opts(str(tmp_path / "v1"), **o))
    with v1, PackedDataset(opts(str(tmp_path / "zstd"), **o)) as zs:
        for a, b, c in zip(want, take(v1, 12), take(zs, 12), strict=True):
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
        assert zs.bytes_read == 0  # decoded by zarr, not read by range


def test_chunk_of_fill_values_is_read(tmp_path):
    """zarr writes no file for an all-fill chunk; a range read yields the fill value."""
    path = tmp_path / "p"
    tokens = write_store(path)["train"][0].copy()
    tokens[8:16] = 0
    zarr.open_group(str(path), mode="a")["train"]["tokens"][8:16] = 0
    assert not (path / "train" / "tokens" / "c" / "1" / "0").exists()
    with PackedDataset(opts(str(path), shuffle=False, batch_size=8, in_memory_max_mb=0)) as ds:
        for i, b in enumerate(take(ds, 3)):
            assert np.array_equal(b["input_ids"].numpy(), tokens[8 * i : 8 * i + 8, :-1])


def test_state_of_the_old_shuffle_refused(store):
    uri, _ = store
    with PackedDataset(opts(uri)) as ds:
        take(ds, 2)
        state = {**ds.state_dict(), "version": 1}
    with PackedDataset(opts(uri)) as ds, pytest.raises(ConfigError, match="version 1") as err:
        ds.load_state_dict(state)
    assert "\n" not in str(err.value)
    with PackedDataset(opts(uri, shuffle=False)) as ds:  # no shuffle: the same order then and now
        ds.load_state_dict({**state, "shuffle": False})
        assert ds.state_dict()["position"] == 8


def test_one_manifest_reader(store, tmp_path):
    import k2_data
    import k2_data.prepare
    from k2_data.loader import read_manifest

    assert read_manifest is k2_data.prepare.read_manifest is k2_data.read_manifest
    uri, _ = store
    assert read_manifest(uri)["version"] == 2
    write_manifest(tmp_path, version=3)
    with pytest.raises(ConfigError, match="version 3.*upgrade k2-data"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": True, "seq_len": 8}))
    with pytest.raises(ConfigError, match="format None"):
        read_manifest(str(tmp_path))
