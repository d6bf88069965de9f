"""zarr checkpoints: exact round trips, the commit marker, checksums, fsspec URIs."""

from __future__ import annotations

import pytest
import torch
from k2_core import CheckpointError
from k2_core.checkpoint import COMMIT, is_committed, load_tensors, save_tensors
from k2_core.configio import load_config
from k2_core.model import build_model
from k2_core.modelio import load_model, save_model


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(5, 7, generator=g),
        "w16": torch.randn(3, 4, generator=g).bfloat16(),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_is_exact(tmp_path, where):
    uri = str(tmp_path / "ck") if where == "local" else f"memory://ck-{id(tmp_path)}"
    ts = _tensors()
    save_tensors(uri, {"model": ts, "optim": {"m": ts["w32"] * 2}}, {"step": 4})
    assert is_committed(uri)
    groups, attrs = load_tensors(uri)
    assert attrs["step"] == 4 and attrs["format"] == "k2-checkpoint"
    for k, t in ts.items():
        got = groups["model"][k]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    only, _ = load_tensors(uri, ["optim"])
    assert list(only) == ["optim"]


def test_uncommitted_checkpoint_is_refused(tmp_path):
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": {"a": torch.ones(3)}})
    (tmp_path / "ck" / COMMIT).unlink()  # as if the writer was killed before the marker
    with pytest.raises(CheckpointError, match="incomplete"):
        load_tensors(uri)
    with pytest.raises(CheckpointError, match="missing"):
        load_tensors(str(tmp_path / "nothing"))


def test_corruption_is_detected(tmp_path):
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": {"a": torch.arange(64, dtype=torch.float32)}})
    chunk = next(
        p
        for p in (tmp_path / "ck" / "model" / "a").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_tensors(uri)


def test_large_tensors_are_chunked_by_rows(tmp_path, monkeypatch):
    import k2_core.checkpoint as ck
    import zarr

    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 256)  # 16 rows of 16 -> 7 chunks, evened to 15 rows
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": {"big": torch.randn(100, 16)}})
    arr = zarr.open_group(uri, mode="r")["model/big"]
    assert arr.chunks == (15, 16)
    assert load_tensors(uri)[0]["model"]["big"].shape == (100, 16)


def test_save_and_load_model(tmp_path):
    cfg = load_config("tiny", ["model.num_hidden_layers=2"])
    model = build_model(cfg)
    save_model(model, str(tmp_path / "m"), run_config=cfg)
    back = load_model(str(tmp_path / "m"))
    x = torch.randint(0, cfg.model.vocab_size, (2, 12))
    assert torch.equal(model(x).logits, back(x).logits)
    sd, bd = model.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)


def test_truncated_chunk_names_the_array(tmp_path):
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": {"w": torch.arange(64, dtype=torch.float32)}})
    chunk = next(
        p
        for p in (tmp_path / "ck" / "model" / "w").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(chunk.read_bytes()[:37])
    with pytest.raises(
        CheckpointError, match=r"tensor model/w (cannot be read|fails its checksum)"
    ):
        load_tensors(uri)


def test_zarr_reads_the_chunks_k2_writes(tmp_path, monkeypatch):
    """Plain zarr reads what k2 writes (partial chunks, 0-d, zero-size, bf16 as int16); bug: a
    zero-size tensor could not be checksummed."""
    import k2_core.checkpoint as ck
    import numpy as np
    import zarr

    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 64)  # several chunks, the last one partial
    ts = {
        "rows": torch.randn(37, 5),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(9, 3).bfloat16(),
        "cube": torch.randn(7, 2, 3),
    }
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": ts})
    root = zarr.open_group(uri, mode="r")
    assert root["model/rows"].chunks[0] < 37
    for name, t in ts.items():
        want = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        assert np.array_equal(root[f"model/{name}"][...], want.numpy()), name
    back = load_tensors(uri)[0]["model"]
    for name, t in ts.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_missing_chunk_names_the_array(tmp_path, monkeypatch):
    """The local reader reads chunk files itself: a deleted chunk is an error, not zeros."""
    import k2_core.checkpoint as ck

    monkeypatch.setattr(ck, "CHUNK_ELEMENTS", 64)
    uri = str(tmp_path / "ck")
    save_tensors(uri, {"model": {"w": torch.randn(40, 4)}})
    (tmp_path / "ck" / "model" / "w" / "c" / "1" / "0").unlink()
    with pytest.raises(
        CheckpointError, match=r"tensor model/w cannot be read \(chunk c/1/0 missing"
    ):
        load_tensors(uri)
