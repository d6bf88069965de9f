"""Weight sync: bucketed broadcast over 2 gloo processes, bucket plans, the version gate."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from k2_rl.weight_sync import (
    DistributedSync,
    StaleRolloutError,
    VersionGate,
    bucket_plan,
    sync_state,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 32)
    )
    net.register_buffer("counts", torch.arange(7, dtype=torch.int64))
    return net


class _Sink:
    """The receiving side of an engine: loads what arrives, remembers the version."""

    def __init__(self, net):
        self.net, self.version = net, -1

    def load_weights(self, state, version):
        self.net.load_state_dict(state)
        self.version = version


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sync = DistributedSync(src=0, bucket_mb=0.02)  # ~20 KiB buckets: several per push
        if rank == 0:
            trainer = _net(1)
            for version in (3, 4):
                with torch.no_grad():
                    trainer[0].weight.add_(version)
                sync.send(trainer, version)
        else:
            sink = _Sink(_net(2))
            template = sync_state(sink.net)
            got = []
            for _ in range(2):
                got.append(sync.receive(sink, template))
            out.put(
                (
                    got,
                    sink.version,
                    sync.buckets,
                    {k: v.numpy().copy() for k, v in sink.net.state_dict().items()},
                )
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_bucketed_broadcast_between_two_processes():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got, version, buckets, state = out.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = _net(1)
    with torch.no_grad():
        want[0].weight.add_(3).add_(4)
    assert got == [3, 4] and version == 4 and buckets > 2
    for k, v in want.state_dict().items():
        assert torch.equal(torch.from_numpy(state[k]), v), k


def test_bucket_plan_respects_size_and_dtype():
    state = {
        "a": torch.zeros(1000),
        "b": torch.zeros(1000),
        "c": torch.zeros(10, dtype=torch.int64),
        "d": torch.zeros(3000),
    }
    plan = bucket_plan(state, bucket_mb=8000 / 2**20)
    assert plan == [["a", "b"], ["c"], ["d"]]  # d alone is larger than a bucket: its own
    assert bucket_plan(state, 1.0) == [["a", "b"], ["c"], ["d"]]


def test_version_gate_refuses_stale_rollouts():
    gate = VersionGate(max_lag=1)
    assert gate.accepts(4, 5) and gate.accepts(5, 5) and not gate.accepts(3, 5)
    gate.check(4, 5)
    with pytest.raises(StaleRolloutError, match="2 versions behind"):
        gate.check(3, 5)


def test_in_process_sync_gives_the_engine_the_new_policy():
    from k2_core.model import K2ForCausalLM
    from k2_data.inference.engine import Engine, SamplingParams
    from k2_rl.weight_sync import InProcessSync
    from rl_fixtures import tiny_configs, tiny_tokenizer

    tok = tiny_tokenizer()
    cfgs = tiny_configs(tok.vocab_size)
    trainer = K2ForCausalLM(*cfgs)  # initialised from seed 0
    other = K2ForCausalLM(*cfgs, init_weights=False)
    other.init_weights(seed=1)  # another policy: the engine's weights before the push
    engine = Engine(other, tok)
    prompt = [tok.encode("What is 2 + 2?")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompt, greedy)[0]
    sync = InProcessSync(engine)
    sync.push(trainer, 7)
    after = engine.generate(prompt, greedy)[0]
    assert engine.version == 7 and sync.last_bytes > 0
    ref = Engine(trainer, tok).generate(prompt, greedy)[0]
    assert after.token_ids == ref.token_ids and after.token_ids != before.token_ids
    # the engine holds a copy: training the trainer's weights later does not leak into it
    with torch.no_grad():
        next(trainer.parameters()).add_(1.0)
    assert not torch.equal(next(engine.model.parameters()), next(trainer.parameters()))
