"""Rank-parallel checkpoints: 4 simulated ranks write their shards, any layout reads its rows.

Ranks are simulated in one process (each with its own ShardWriter / CheckpointReader): the
store, the manifests and the byte counts are the same as with 4 processes, minus the barrier.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from k2_core import CheckpointError
from k2_core import checkpoint as ck
from k2_core.checkpoint import (
    COMMIT,
    CheckpointReader,
    CountingWriter,
    ShardWriter,
    check_checkpoint_dir,
    chunk_rows,
    commit_sharded,
    load_tensors,
    num_chunks,
    read_rows,
    split_rows,
    spread_rows,
)
from k2_core.trainstate import (
    commit_train_state,
    list_checkpoints,
    load_train_state,
    save_train_state,
    step_uris,
)

DATA = Path(__file__).parent / "data"
WORLD = 4
MB = 1 << 20


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """16 Ki-element row blocks: many chunks per tensor at test sizes (64 rows of 256)."""
    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 1 << 14)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """~18 MB of model and AdamW-like state, keyed 'group/name'."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(4000, 256, generator=g)
    return {
        "model/experts.w": torch.randn(16, 128, 256, generator=g),
        "model/experts.v": torch.randn(16, 128, 128, generator=g).bfloat16(),
        "model/embed": embed,
        "model/head": torch.randn(256, 2000, generator=g).t(),  # not contiguous: copied per block
        "model/norm": torch.randn(256, generator=g),
        "model/scale": torch.tensor(0.5),
        "optim/2.exp_avg": embed * 0.1,
        "optim/2.exp_avg_sq": embed.square(),
        "optim/0.exp_avg": torch.randn(16, 128, 256, generator=g),
        "rng/torch": torch.arange(5056, dtype=torch.uint8),
    }


def _nbytes(shape, dtype, rows) -> int:
    """Bytes the chunks covering `rows` rows of a tensor take in the store (padding included)."""
    item = torch.empty((), dtype=dtype).element_size()
    n = num_chunks((rows, *shape[1:]), chunk_rows(shape)) if shape else 1
    return n * (chunk_rows(shape) * int(np.prod(shape[1:])) * item if shape else item)


def _commit_step(root: str, step: int, value: float) -> str:
    """A one-process checkpoint of step `step` through the sharded path (write, commit, prune)."""
    with ShardWriter(step_uris(root, step)[0], 0) as w:
        w.write("model", "w", (3, 4), torch.float32, 0, torch.full((3, 4), value))
    return commit_train_state(root, step, 1, {"step": step})


def _layout(state: dict[str, torch.Tensor], world: int) -> dict[int, list[tuple[str, int, int]]]:
    """Experts by EP rank, optimizer rows by ZeRO owner, replicated tensors spread over ranks."""
    plan: dict[int, list[tuple[str, int, int]]] = {r: [] for r in range(world)}
    load = [0] * world
    replicated = {}
    for key, t in state.items():
        if t.dim() == 3 or key.startswith("optim/"):  # sharded: experts and ZeRO moments
            for r, (a, b) in enumerate(split_rows(t.shape, world)):
                plan[r].append((key, a, b))
                load[r] += _nbytes(tuple(t.shape), t.dtype, b - a)
        else:
            replicated[key] = (tuple(t.shape), t.dtype)
    for key, runs in spread_rows(replicated, world, load).items():
        for r, a, b in runs:
            plan[r].append((key, a, b))
    return plan


def _save(
    uri: str,
    state: dict[str, torch.Tensor],
    world: int = WORLD,
    skip_close: int | None = None,
    writer=ShardWriter,
) -> list:
    """Every simulated rank writes its rows; returns the writers (closed unless skipped)."""
    writers = []
    for rank, items in _layout(state, world).items():
        w = writer(uri, rank) if writer is ShardWriter else writer(rank)
        for key, a, b in items:
            t = state[key]
            group, name = key.split("/", 1)
            w.write(group, name, t.shape, t.dtype, a, t if t.dim() == 0 else t[a:b])
        if rank != skip_close:
            w.close()
        writers.append(w)
    return writers


def _chunk_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name not in ("zarr.json", COMMIT)]


def test_the_chunk_grid_is_fixed_by_the_shape(monkeypatch):
    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 1 << 20)  # the real budget
    assert chunk_rows((384, 7168, 2048)) == 1  # one expert per chunk
    assert chunk_rows((163840, 7168)) == 146  # ~1M elements a chunk, 1123 chunks
    assert chunk_rows((1000, 1500)) == 500  # 699 rows would pad the edge chunk by 398
    assert chunk_rows((7168,)) == 7168 and chunk_rows(()) == 1  # small: one chunk
    assert chunk_rows((0, 4)) == 1 and num_chunks((0, 4)) == 0
    # the split the ZeRO optimizer aligns to: whole chunks, in order, covering every row
    parts = split_rows((163840, 7168), 6)
    assert parts[0][0] == 0 and parts[-1][1] == 163840
    assert all(a % 146 == 0 and b == c for (a, b), (c, _) in zip(parts, parts[1:], strict=False))


def test_four_ranks_write_a_plain_zarr_store(tmp_path):
    import zarr

    state, uri = _state(), str(tmp_path / "ck")
    writers = _save(uri, state)
    assert commit_sharded(uri, None, WORLD, {"step": 7}) == uri
    root = zarr.open_group(uri, mode="r")
    assert root.attrs["format_version"] == 2 and root.attrs["step"] == 7
    for key, t in state.items():
        want = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        assert np.array_equal(root[key][...], want.numpy()), key
        assert t.dim() == 0 or root[key].chunks[0] == chunk_rows(t.shape)
    back, attrs = load_tensors(uri)
    assert attrs["step"] == 7
    for key, t in state.items():
        group, name = key.split("/", 1)
        assert back[group][name].dtype == t.dtype and torch.equal(back[group][name], t), key
    # every byte written by exactly one rank; nothing of the manifests left in the store
    per_rank = [w.bytes_written for w in writers]
    stored = sum(p.stat().st_size for p in _chunk_files(tmp_path / "ck"))
    assert sum(per_rank) == stored
    assert json.loads((tmp_path / "ck" / COMMIT).read_text())["ranks"] == {
        str(r): b for r, b in enumerate(per_rank)
    }
    assert not (tmp_path / "ck" / ck.RANKS_DIR).exists()
    share = stored / WORLD
    assert max(per_rank) <= 1.1 * share + MB, (per_rank, share)
    assert max(per_rank) <= 1.02 * share, "the spread should even out to within a few chunks"


def _need(state, rows_of) -> int:
    """Bytes of the chunks a rank must hold: its rows of each tensor, rounded to chunks."""
    return sum(_nbytes(tuple(state[k].shape), state[k].dtype, b - a) for k, a, b in rows_of)


def _holds(state, world: int, rank: int, cuts=None) -> list[tuple[str, int, int]]:
    """The rows rank `rank` holds in training: its shard of sharded tensors, all of the rest."""
    out = []
    for key, t in state.items():
        total = t.shape[0] if t.dim() else 1
        if t.dim() == 3 or key.startswith("optim/"):
            a, b = (cuts or (lambda s, w: split_rows(s, w)))(t.shape, world)[rank]
            out.append((key, a, b))
        else:
            out.append((key, 0, total))
    return out


def test_each_rank_reads_only_its_rows(tmp_path):
    state, uri = _state(), str(tmp_path / "ck")
    _save(uri, state)
    commit_sharded(uri, None, WORLD)

    def read_as(world, cuts=None):
        ratios = []
        for rank in range(world):
            reader = CheckpointReader(uri)
            holds = _holds(state, world, rank, cuts)
            for key, a, b in holds:
                got = reader.read_rows(*key.split("/", 1), a, b)
                want = state[key] if state[key].dim() == 0 else state[key][a:b]
                assert torch.equal(got, want), (key, a, b)
            ratios.append(reader.bytes_read / _exact(state, holds))
        return ratios

    same = read_as(WORLD)
    assert max(same) <= 1.1, same

    # another layout: 3 ranks whose optimizer rows ignore the chunk grid
    def uneven(shape, world):
        edges = np.linspace(0, shape[0], world + 1).astype(int)
        return list(zip(edges[:-1], edges[1:], strict=True))

    other = read_as(3, uneven)
    assert max(other) <= 2.0, other
    assert max(read_as(3)) <= 1.1  # 3 ranks on the chunk grid read only what they hold


def _exact(state, holds) -> int:
    """The bytes of the rows themselves (what a rank's share is, before rounding to chunks)."""
    total = 0
    for key, a, b in holds:
        t = state[key]
        total += t.element_size() * (int(np.prod(t.shape[1:])) * (b - a) if t.dim() else 1)
    return total


def test_a_rank_killed_mid_save_commits_nothing(tmp_path):
    root = str(tmp_path / "run")
    _commit_step(root, 1, 1.0)
    state = _state()
    tmp, _ = step_uris(root, 2)
    _save(tmp, state, skip_close=2)  # rank 2 dies before its manifest
    with pytest.raises(CheckpointError, match=r"rank 2 did not finish .*not committed"):
        commit_train_state(root, 2, WORLD, {"step": 2})
    assert [s for s, _ in list_checkpoints(root)] == [1]
    groups, attrs = load_tensors(list_checkpoints(root)[-1][1])
    assert attrs["step"] == 1 and torch.equal(groups["model"]["w"], torch.ones(3, 4))
    # the retry: rank 2's writer from this attempt never closed; a new one finishes the step
    w = ShardWriter(tmp, 2)
    for key, a, b in _layout(state, WORLD)[2]:
        t = state[key]
        w.write(*key.split("/", 1), t.shape, t.dtype, a, t if t.dim() == 0 else t[a:b])
    w.close()
    uri = commit_train_state(root, 2, WORLD, {"step": 2}, keep=1)
    assert [s for s, _ in list_checkpoints(root)] == [2]
    assert torch.equal(read_rows(uri, "model", "embed", 64, 128), state["model/embed"][64:128])


def test_missing_or_twice_written_chunks_are_named(tmp_path):
    t = torch.randn(256, 256)  # 4 chunks of 64 rows
    uri = str(tmp_path / "a")
    for rank, (a, b) in enumerate([(0, 128), (64, 192)]):
        with ShardWriter(uri, rank) as w:
            w.write("optim", "m", t.shape, t.dtype, a, t[a:b])
    with pytest.raises(CheckpointError, match=r"tensor optim/m chunk 1 written by ranks 0 and 1"):
        commit_sharded(uri, None, 2)
    uri = str(tmp_path / "b")
    for rank, (a, b) in enumerate([(0, 64), (128, 256)]):
        with ShardWriter(uri, rank) as w:
            w.write("optim", "m", t.shape, t.dtype, a, t[a:b])
    with pytest.raises(CheckpointError, match=r"tensor optim/m chunk 1 was written by no rank"):
        commit_sharded(uri, None, 2)
    assert not (tmp_path / "b" / COMMIT).exists()


def test_unaligned_writes_are_refused(tmp_path):
    t = torch.randn(256, 256)
    w = ShardWriter(str(tmp_path / "ck"), 0)
    with pytest.raises(ValueError, match=r"rows \[10, 64\) are not chunk-aligned \(chunks of 64"):
        w.write("optim", "m", t.shape, t.dtype, 10, t[10:64])
    with pytest.raises(ValueError, match="not chunk-aligned"):
        w.write("optim", "m", t.shape, t.dtype, 0, t[:100])
    w.write("optim", "m", t.shape, t.dtype, 192, t[192:])  # ends at the array end: fine
    w.close()


def test_corrupt_or_truncated_chunks_are_one_line_errors(tmp_path):
    state, uri = _state(), str(tmp_path / "ck")
    _save(uri, state)
    commit_sharded(uri, None, WORLD)
    chunk = tmp_path / "ck" / "model" / "embed" / "c" / "3" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert torch.equal(read_rows(uri, "model", "embed", 0, 192), state["model/embed"][:192])
    with pytest.raises(CheckpointError) as e:
        read_rows(uri, "model", "embed", 150, 250)
    assert str(e.value) == (
        f"checkpoint error: {uri}: tensor model/embed fails its checksum "
        f"(chunk c/3/0, corrupt file)"
    )
    chunk.write_bytes(bytes(raw[:1000]))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model/embed cannot be read \(chunk c/3/0 "
        r"truncated\)",
    ):
        load_tensors(uri)


def _keys(fs, root: str) -> list[str]:
    return sorted(p[len(root) :].lstrip("/") for p in fs.find(root))


def test_an_fsspec_store_gets_the_same_layout(tmp_path):
    import fsspec

    state = _state()
    local, mem = str(tmp_path / "ck"), f"memory://k2-sharded-{os.getpid()}/ck"
    try:
        for uri in (local, mem):
            _save(uri, state)
            commit_sharded(uri, None, WORLD, {"step": 1})
        lfs, mfs = fsspec.filesystem("file"), fsspec.filesystem("memory")
        mroot = mem.removeprefix("memory://")
        assert _keys(lfs, local) == _keys(mfs, "/" + mroot.lstrip("/"))
        for p in _keys(lfs, local):
            if p != COMMIT:
                assert lfs.cat_file(f"{local}/{p}") == mfs.cat_file(f"{mroot}/{p}"), p
        back, _ = load_tensors(mem)
        assert torch.equal(back["optim"]["2.exp_avg"], state["optim/2.exp_avg"])
        reader = CheckpointReader(mem)
        assert torch.equal(
            reader.read_rows("model", "experts.w", 4, 8), state["model/experts.w"][4:8]
        )
        assert reader.bytes_read == 4 * 128 * 256 * 4
    finally:
        fsspec.filesystem("memory").rm(mem.removeprefix("memory://").split("/")[0], recursive=True)


def test_version_1_stores_still_load(tmp_path):
    """tests/core/data holds stores the version 1 writer made (see the fixture script below)."""
    g = torch.Generator().manual_seed(0)
    want = {
        "w32": torch.randn(37, 5, generator=g),
        "w16": torch.randn(9, 3, generator=g).bfloat16(),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(10),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "cube": torch.randn(7, 2, 3, generator=g),
    }
    uri = str(DATA / "v1_tensors")
    groups, attrs = load_tensors(uri)
    assert attrs["format_version"] == 1 and attrs["step"] == 4
    for k, t in want.items():
        got = groups["model"][k]
        bits = (got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(*bits), k
    assert torch.equal(groups["optim"]["m"], want["w32"] * 2)
    reader = CheckpointReader(uri)
    assert reader.version == 1 and reader.tensors["model/w16"].shape == (9, 3)
    assert torch.equal(reader.read_rows("model", "w32", 12, 30), want["w32"][12:30])
    root = tmp_path / "run"
    shutil.copytree(DATA / "v1_trainstate", root)
    found = list_checkpoints(str(root))
    assert [s for s, _ in found] == [3]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert load_train_state(found[-1][1], model=model, optimizer=opt)["step"] == 3
    assert opt.state_dict()["state"][0]["exp_avg"].shape == (3, 4)
    # the resumed run saves version 2 beside it, and retention counts both
    save_train_state(str(root), 4, model=model, optimizer=opt, keep=2)
    assert [s for s, _ in list_checkpoints(str(root))] == [3, 4]


def test_counting_writer_adds_up_without_touching_data(tmp_path):
    state, uri = _state(), str(tmp_path / "ck")
    real = [w.bytes_written for w in _save(uri, state)]
    meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in state.items()}
    dry = _save(uri, meta, writer=CountingWriter)
    assert [w.bytes_written for w in dry] == real
    summary = dry[1].close()
    assert summary["rank"] == 1 and summary["bytes"] == real[1]
    assert sum(s for a in summary["arrays"].values() for _, s in a["chunks"].values()) == real[1]


@pytest.mark.parametrize(
    "file,text,why",
    [
        (COMMIT, "{not json", r"k2_commit.json: not valid JSON \(Expecting property name"),
        (COMMIT, '{"format": "k2-checkpoint"}', r"k2_commit.json: not a k2 commit marker"),
        (
            COMMIT,
            '{"format_version": 2, "tensors": {"model/w": {"shape": "3", "dtype": "float32"}}}',
            r"k2_commit.json: tensor model/w: 'shape' must be a list",
        ),
        (
            COMMIT,
            '{"format_version": 2, "tensors": {"model/w": {"shape": [3], "dtype": "floaty"}}}',
            r"k2_commit.json: tensor model/w: 'dtype' is not a torch dtype",
        ),
        (
            COMMIT,
            '{"format_version": 2, "tensors": {"model/w": {"shape": [3], "dtype": "float32", '
            '"chunk_rows": 3, "crc32": 5}}}',
            r"tensor model/w: 'crc32' must list 1 checksums",
        ),
        (
            COMMIT,
            '{"format_version": 9, "tensors": {}}',
            r"format version 9 is not one this k2 reads",
        ),
        (COMMIT, "[]", r"not a k2 commit marker"),
        ("zarr.json", "\x00\x01garbage", r"ck/zarr.json: not valid JSON"),
        ("zarr.json", '{"attributes": [1]}', r"ck/zarr.json: not a zarr group"),
    ],
)
def test_garbage_metadata_is_a_one_line_error(tmp_path, file, text, why):
    uri = str(tmp_path / "ck")
    ck.save_tensors(uri, {"model": {"w": torch.ones(3)}})
    (tmp_path / "ck" / file).write_text(text)
    with pytest.raises(CheckpointError, match=why) as e:
        load_tensors(uri)
    assert "\n" not in str(e.value)


def test_list_checkpoints_says_why_it_skips_a_folder(tmp_path, caplog):
    root = tmp_path / "run"
    _commit_step(str(root), 1, 1.0)
    (root / "step_00000002").mkdir()
    (root / "step_00000003.tmp").mkdir()
    with caplog.at_level(logging.WARNING):
        assert [s for s, _ in list_checkpoints(str(root))] == [1]
    lines = [r.getMessage() for r in caplog.records]
    assert any("step_00000002" in m and "no commit marker" in m for m in lines), lines
    assert any("step_00000003.tmp" in m and "never committed" in m for m in lines), lines
    assert all("\n" not in m for m in lines)


def test_check_checkpoint_dir(tmp_path):
    check_checkpoint_dir(str(tmp_path))  # exists, writable
    check_checkpoint_dir(str(tmp_path / "new" / "deeper"))  # creatable ...
    assert not (tmp_path / "new").exists()  # ... and the check leaves no trace
    check_checkpoint_dir(f"memory://k2-check-{os.getpid()}/x")
    (tmp_path / "f").write_text("x")
    for bad, why in [
        (tmp_path / "f", "is a file"),
        (tmp_path / "f" / "sub", "is a file"),
        ("/proc/k2-ckpt", "kernel pseudo-filesystem"),
    ]:
        with pytest.raises(CheckpointError, match=why) as e:
            check_checkpoint_dir(str(bad))
        assert "\n" not in str(e.value)


_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from k2_core.checkpoint import ShardWriter, commit_sharded

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    big = torch.empty(128, 1024, 1024)  # 512 MiB expert stack
    big.fill_(1.5)
    out = []
    # straight from memory, and converted block by block (a quarter of it, to save time)
    for i, (dtype, src) in enumerate(((torch.float32, big), (torch.bfloat16, big[:32]))):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        base = rss("VmRSS:")
        uri = f"{sys.argv[1]}/{i}"
        with ShardWriter(uri, 0) as w:
            w.write("model", "big", src.shape, dtype, 0, src)
        commit_sharded(uri, None, 1)
        out.append(rss("VmHWM:") - base)
    print(*out)
""")


def test_a_streamed_save_adds_little_to_the_resident_set(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = [int(x) for x in proc.stdout.split()]
    assert max(extra) < 256 * MB, [x / MB for x in extra]
