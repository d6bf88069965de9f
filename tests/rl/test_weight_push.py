"""Weight push from a sharded trainer to engines over TCP on 127.0.0.1 (k2_rl.weight_push).

In one process: a trainer (OneProcess sharding) pushes to two in-process receivers over real
sockets; corrupt, dropped and out-of-order versions are refused and the engines keep their
weights. Distributed: 4 gloo trainer ranks of the h800 backend at DP2 x EP2 push to 2 engine
processes; the engines end up with the trainers' checkpoint exactly, each rank sent its share.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from k2_core.weight_push import (
    BucketChecksumError,
    Faults,
    MissingBucketError,
    VersionGapError,
    WeightPusher,
    WeightReceiver,
    engine_status,
    tensor_crc32,
)
from small_model import small_model

# -- one process ------------------------------------------------------------------------------


def _tiny_model(seed: int) -> torch.nn.Module:
    from k2_core.model import K2ForCausalLM
    from rl_fixtures import tiny_configs

    mcfg, ecfg = tiny_configs(97)
    torch.manual_seed(seed)
    return K2ForCausalLM(mcfg, ecfg)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def engines():
    from k2_data.inference.engine import Engine

    recvs = [WeightReceiver(Engine(_tiny_model(100 + i), max_batch_size=4)) for i in range(2)]
    yield recvs
    for r in recvs:
        r.close()


def test_push_assembles_the_trainers_weights_and_refuses_bad_pushes(engines):
    from k2_core.backend import SingleProcessBackend

    trainer = _tiny_model(1)
    pusher = WeightPusher([r.address for r in engines], bucket_mb=0.05)
    sharding = SingleProcessBackend().checkpoint_sharding(trainer, None)  # OneProcess
    stats = pusher.push(trainer, 1, sharding=sharding)
    want = _state(trainer)
    assert stats.buckets > 3 and stats.bytes == sum(
        t.numel() * t.element_size() for t in want.values()
    )
    for r in engines:
        assert r.version == 1 and _same(_state(r.engine.model), want)
    with torch.no_grad():  # new weights that a refused push must not let through
        for p in trainer.parameters():
            p.add_(1.0)

    pusher.faults = Faults(corrupt=2)
    with pytest.raises(BucketChecksumError, match=r"bucket 2 of trainer rank 0 .*crc32.*version 1"):
        pusher.push(trainer, 2)
    pusher.faults = Faults(drop=1)
    with pytest.raises(MissingBucketError, match=r"bucket 1 of trainer rank 0 never arrived"):
        pusher.push(trainer, 2)
    pusher.faults = None
    with pytest.raises(
        VersionGapError, match=r"version 3 to an engine on version 1 \(expected 2\)"
    ):
        pusher.push(trainer, 3)
    for r in engines:
        assert r.version == 1 and _same(_state(r.engine.model), want)

    pusher.push(trainer, 2)
    pusher.push(trainer, 7, full=True)  # a full reload may jump
    for r in engines:
        assert r.version == 7 and _same(_state(r.engine.model), _state(trainer))
    status = engine_status(engines[0].address)
    assert status["version"] == 7
    assert status["crc32"] == {k: tensor_crc32(v) for k, v in _state(trainer).items()}


def test_a_generation_in_flight_finishes_on_its_version(engines):
    from k2_data.inference.engine import SamplingParams

    recv = engines[0]
    trainer = _tiny_model(1)
    pusher = WeightPusher([recv.address], bucket_mb=0.05)
    pusher.push(trainer, 1)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    out: list = []
    gen = threading.Thread(target=lambda: out.extend(recv.generate([[1, 2, 3]] * 4, params)))
    gen.start()
    while not recv._serving.locked() and gen.is_alive():
        time.sleep(0.001)
    pusher.push(trainer, 2)  # staged while generating; the switch waits for the generation
    gen.join()
    assert recv.version == 2
    assert [c.version for c in out] == [1] * 4
    assert all(c.version == 2 for c in recv.generate([[1, 2]], SamplingParams(max_new_tokens=2)))


def test_a_missing_tensor_is_named():
    from k2_core.trainstate import Held

    class _Half:  # a sharding whose assignment leaves a tensor out: rows nobody sends
        rank, world_size = 0, 1

        def assign(self, held: list[Held]) -> list[Held]:
            return [h for h in held if not h.name.endswith("norm.weight")]

        def barrier(self) -> None:
            pass

    from k2_data.inference.engine import Engine

    with WeightReceiver(Engine(_tiny_model(3), max_batch_size=2)) as recv:
        with pytest.raises(
            MissingBucketError,
            match=r"rows 0\.\.\d+ of \S+norm\.weight were in no"
            r" bucket of version 1; the engine stays on version 0",
        ):
            WeightPusher([recv.address]).push(_tiny_model(1), 1, sharding=_Half())
        assert recv.version == 0


# -- 4 gloo trainer ranks (h800 backend, DP2 x EP2) to 2 engine processes ----------------------

SHRINK = [
    *small_model(),
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "tracking.tracker=null",
]
ENV = {"K2_LOAD_PLUGINS": "optim,moe,data,hw_h800", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_main(conn, cache: str) -> None:
    """An engine process: the whole model, a receiver on 127.0.0.1; dumps its state on ask."""
    from k2_core.configio import load_config
    from k2_core.model import K2ForCausalLM
    from k2_core.plugins import get_registry
    from k2_data.inference.engine import Engine
    from safetensors.torch import save_file

    os.environ.update(ENV, K2_CACHE_DIR=cache)
    torch.set_num_threads(1)
    cfg = load_config("tiny", SHRINK)
    model = K2ForCausalLM(cfg.model, cfg.moe, get_registry(), init_weights=False)
    with WeightReceiver(Engine(model, max_batch_size=2)) as recv:
        conn.send(recv.address)
        while (msg := conn.recv())[0] == "dump":
            save_file(
                {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, msg[1]
            )
            conn.send(recv.version)


def _push(pusher, run, version, sharding, **kw) -> list[str] | None:
    """Push; None, or [error class name, message] when refused."""
    from k2_core.weight_push import WeightPushError

    try:
        pusher.push(run.model, version, sharding=sharding, **kw)
    except WeightPushError as exc:
        return [type(exc).__name__, str(exc)]
    return None


def _trainer(rank: int, world: int, port: int, cache: str, root: str, engines: list, out: str):
    import torch.distributed as dist
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run, train
    from k2_core.trainstate import model_tensors

    os.environ.update(
        ENV,
        K2_CACHE_DIR=cache,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        run = build_run(
            load_config(
                "tiny",
                [
                    *SHRINK,
                    "parallel.backend=h800",
                    "parallel.options.ep=2",
                    "train.steps=1",
                    "checkpoint.every=1",
                    f"checkpoint.dir={root}",
                ],
            )
        )
        train(run)  # one step, then the layout-free checkpoint the engines must equal
        sharding = run.backend.checkpoint_sharding(run.model, run.optimizer)
        pusher = WeightPusher([tuple(a) for a in engines], bucket_mb=0.02)
        res: dict = {
            "first": _push(pusher, run, 1, sharding),
            "bytes": pusher.last.bytes,
            "per_rank": pusher.last.per_rank_bytes,
            "buckets": pusher.last.buckets,
        }
        if rank == 0:
            res["status1"] = [engine_status(tuple(a)) for a in engines]
        with torch.no_grad():  # new weights a refused push must not let through
            seen = set()
            for h in model_tensors(run.model):
                if h.tensor.is_floating_point() and h.tensor.data_ptr() not in seen:
                    seen.add(h.tensor.data_ptr())
                    h.tensor.add_(1.0)
        pusher.faults = Faults(corrupt=1) if rank == 1 else None
        res["corrupt"] = _push(pusher, run, 2, sharding)
        pusher.faults = Faults(drop=1) if rank == 2 else None
        res["drop"] = _push(pusher, run, 2, sharding)
        pusher.faults = None
        res["gap"] = _push(pusher, run, 3, sharding)
        if rank == 0:
            res["status_refused"] = [engine_status(tuple(a)) for a in engines]
        res["second"] = _push(pusher, run, 2, sharding)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_four_sharded_trainer_ranks_push_to_two_engine_processes(tmp_path):
    from k2_core.checkpoint import load_tensors
    from safetensors.torch import load_file

    cache, root, out = str(tmp_path / "cache"), str(tmp_path / "run"), str(tmp_path / "res")
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(2):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_engine_main, args=(theirs, cache), daemon=True)
        p.start()
        pipes.append(mine)
        procs.append(p)
    try:
        engines = [list(c.recv()) for c in pipes]
        mp.start_processes(
            _trainer,
            args=(4, _free_port(), cache, root, engines, out),
            nprocs=4,
            join=True,
            start_method="fork",
        )
        res = [json.load(open(f"{out}.{r}")) for r in range(4)]
        dumps = []
        for i, c in enumerate(pipes):
            c.send(("dump", str(tmp_path / f"engine{i}.safetensors")))
            assert c.recv() == 2  # the engines' version after the last push
            dumps.append(load_file(str(tmp_path / f"engine{i}.safetensors")))
    finally:
        for c in pipes:
            c.send(("close",))
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    groups, _ = load_tensors(f"{root}/checkpoints/step_00000001")
    want = groups["model"]
    total = sum(t.numel() * t.element_size() for t in want.values())
    assert all(r["first"] is None and r["second"] is None for r in res)
    # each rank sent only its share: the shares add up to the model, none much above a quarter
    sent = [r["bytes"] for r in res]
    assert res[0]["per_rank"] == sent and sum(sent) == total
    assert max(sent) <= 1.1 * total / 4 + 2**20, sent
    print(f"model {total} bytes, sent per rank {sent}")
    assert min(r["buckets"] for r in res) >= 2
    crcs = {
        k: tensor_crc32(v.float() if v.is_floating_point() else v)  # the engine's FP32
        for k, v in want.items()
    }
    for status in (*res[0]["status1"], *res[0]["status_refused"]):
        assert status["version"] == 1 and status["crc32"] == crcs
    # every refusal reached every rank as the same one line
    for case, kind, pattern in (
        ("corrupt", "BucketChecksumError", r"bucket 1 of trainer rank 1 .*crc32"),
        ("drop", "MissingBucketError", r"bucket 1 of trainer rank 2 never arrived"),
        ("gap", "VersionGapError", r"version 3 to an engine on version 1 \(expected 2\)"),
    ):
        assert all(r[case] == res[0][case] for r in res), case
        assert res[0][case][0] == kind
        assert "\n" not in res[0][case][1]
        assert re.search(pattern, res[0][case][1]), res[0][case][1]
    plus = {k: v + 1 if v.is_floating_point() else v for k, v in want.items()}
    for dump in dumps:
        assert dump.keys() == plus.keys()
        # the trainer's dtype (the h800 policy's) arrives converted to the engine's FP32
        assert all(torch.equal(dump[k], plus[k].to(dump[k].dtype)) for k in plus)


def test_an_engine_that_is_down_fails_the_push_in_one_line(engines):
    from k2_core.weight_push import WeightPushError

    pusher = WeightPusher([engines[0].address, ("127.0.0.1", _free_port())], timeout_s=5)
    with pytest.raises(
        WeightPushError, match=r"trainer rank 0 could not stream to the engines"
    ) as err:
        pusher.push(_tiny_model(1), 1)
    assert "\n" not in str(err.value)
    assert engines[0].version == 0  # the other engine was told to drop what it staged
    pusher.engines = [engines[0].address]
    pusher.push(_tiny_model(1), 1)
    assert engines[0].version == 1


def test_bf16_trainer_weights_land_in_an_fp32_engine(engines):
    trainer = _tiny_model(1).to(torch.bfloat16)
    WeightPusher([engines[0].address], bucket_mb=0.05).push(trainer, 1)
    got = _state(engines[0].engine.model)
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in _state(trainer).items())
