"""`plugins.rl.engine=process`: the rollout engine in a child process, weights by gloo broadcast."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from rl_fixtures import save_tiny_checkpoint, tiny_configs, tiny_tokenizer


def _prompts(tok):
    return [tok.encode(q) for q in ("What is 2 + 2?", "What is 13 + 48?", "7 + 5 =")]


def _reference(model, tok):
    """An in-process engine holding a copy of `model`'s current weights."""
    from k2_core.model import K2ForCausalLM
    from k2_data.inference.engine import Engine

    copy = K2ForCausalLM(model.config, model.moe_config, init_weights=False)
    copy.load_state_dict(model.state_dict())
    return Engine(copy, tok)


def _params():
    """Greedy, and seeded nucleus sampling (one seed per prompt)."""
    from k2_data.inference.engine import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    sampled = [
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=s) for s in (11, 12, 13)
    ]
    return greedy, sampled


def _assert_same(got, want, version):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason and g.text == w.text
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        assert g.version == version


def _gone(proc) -> bool:
    """The child has exited and been reaped (no zombie either)."""
    return not proc.is_alive() and proc.exitcode is not None and proc not in mp.active_children()


@pytest.fixture(scope="class")
def remote(tmp_path_factory):
    """(engine process, trainer model, tokenizer) shared by the tests of one class."""
    from k2_core.model import K2ForCausalLM
    from k2_rl.engine_process import RemoteEngine

    tok = tiny_tokenizer()
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    tok.save(tok_dir)
    mcfg, ecfg = tiny_configs(tok.vocab_size)
    torch.manual_seed(0)
    model = K2ForCausalLM(mcfg, ecfg)
    engine = RemoteEngine(mcfg, ecfg, tok_dir, model=model, version=5, tokenizer=tok)
    yield engine, model, tok
    engine.close()
    assert _gone(engine._process) and engine._process.exitcode == 0
    assert not dist.is_initialized()


@pytest.mark.distributed
class TestRemoteEngine:
    def test_same_completions_as_an_in_process_engine(self, remote):
        engine, model, tok = remote
        assert engine.version == 5 and engine.default_stop_ids
        ref = _reference(model, tok)
        for params in _params():
            _assert_same(
                engine.generate(_prompts(tok), params),
                ref.generate(_prompts(tok), params),
                engine.version,
            )

    def test_push_gives_the_engine_the_new_weights(self, remote):
        from k2_rl.engine_process import EngineProcessError, ProcessSync
        from k2_rl.weight_sync import state_bytes, sync_state

        engine, model, tok = remote
        greedy, sampled = _params()
        before = engine.generate(_prompts(tok), greedy)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        sync = ProcessSync(engine)
        v = engine.version + 1
        sync.push(model, v)
        assert engine.version == v and sync.last_seconds > 0
        assert sync.last_bytes == state_bytes(sync_state(model))
        ref = _reference(model, tok)
        after = engine.generate(_prompts(tok), greedy)
        _assert_same(after, ref.generate(_prompts(tok), greedy), v)
        _assert_same(
            engine.generate(_prompts(tok), sampled), ref.generate(_prompts(tok), sampled), v
        )
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        # a model whose state no longer matches the bucket plan is refused before anything is sent
        with pytest.raises(EngineProcessError, match="changed layout"):
            sync.push(_reference(model, tok).model.double(), v + 1)
        assert engine.version == v and len(engine.generate(_prompts(tok)[:1], greedy)) == 1

    def test_refuses_a_trainer_with_torch_distributed_initialised(self, remote):
        from k2_rl.engine_process import EngineProcessError, RemoteEngine

        engine, model, tok = remote
        assert dist.is_initialized()  # the class's engine holds the group
        with pytest.raises(EngineProcessError, match="already initialised"):
            RemoteEngine(model.config, model.moe_config, None, model=model)


@pytest.mark.distributed
def test_a_hung_engine_fails_within_the_timeout(tmp_path):
    from k2_core.model import K2ForCausalLM
    from k2_rl.engine_process import EngineProcessError, RemoteEngine

    tok = tiny_tokenizer()
    tok.save(str(tmp_path / "tok"))
    mcfg, ecfg = tiny_configs(tok.vocab_size)
    model = K2ForCausalLM(mcfg, ecfg)
    engine = RemoteEngine(mcfg, ecfg, str(tmp_path / "tok"), model=model)
    engine.timeout_s = 2.0  # after the start, which may take longer than that on a busy host
    os.kill(engine.pid, signal.SIGSTOP)  # alive but never answering
    t0 = time.monotonic()
    with pytest.raises(EngineProcessError, match="did not answer generate within 2 s") as err:
        engine.generate(_prompts(tok), _params()[0])
    assert time.monotonic() - t0 < 2.0 + 8.0  # the timeout, then a kill
    assert "\n" not in str(err.value)
    assert _gone(engine._process) and not dist.is_initialized()
    with pytest.raises(EngineProcessError, match="closed"):
        engine.generate(_prompts(tok), _params()[0])


@pytest.mark.distributed
def test_a_child_that_cannot_start_is_one_line_and_gone(tmp_path):
    from k2_core.model import K2ForCausalLM
    from k2_rl.engine_process import EngineProcessError, RemoteEngine

    mcfg, ecfg = tiny_configs(512)
    model = K2ForCausalLM(mcfg, ecfg)
    with pytest.raises(EngineProcessError, match="failed during start: .*no-tokenizer") as err:
        RemoteEngine(mcfg, ecfg, str(tmp_path / "no-tokenizer"), model=model)
    assert "\n" not in str(err.value)
    assert not mp.active_children() and not dist.is_initialized()


# --- `k2 rl` with engine=process ------------------------------------------------------------


def _rl_cfg(init, run_dir, engine, steps=2):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path

    return load_config(
        config_path("rl-math"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={steps}",
            f"plugins.rl.engine={engine}",
            "train.eval_every=2",
            "checkpoint.every=2",
            "data.seq_len=128",
            "data.options.builtin_n=50",
            "train.micro_batch_size=2",
            "optim.lr=1e-3",
            "plugins.rl.k=4",
            "plugins.rl.prompts_per_iter=2",
            "plugins.rl.segment_tokens=6",
            "plugins.rl.default_budget=14",
            "plugins.rl.eval_prompts=2",
            "tracking.tracker=null",
            "plugins.rl.tasks=[{name: math, source: math, reward: math, budget: 14}]",
        ],
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_rl_with_the_engine_in_a_process_matches_colocated(tmp_path):
    from k2_rl.rl_stage import RLTrainer

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    runs = {}
    for mode in ("process", "colocated"):
        seen: list[dict[str, float]] = []
        trainer = RLTrainer(
            _rl_cfg(init, tmp_path / mode, mode), lambda s, m, seen=seen: seen.append(m)
        )
        assert trainer.train()["steps"] == 2
        runs[mode] = (trainer, seen)
    trainer, seen = runs["process"]
    assert trainer.engine.version == 2 and trainer.engine.closed
    assert _gone(trainer.engine._process) and not dist.is_initialized()
    for m in seen:
        assert m["time/sync_s"] > 0 and m["sync/mb_per_s"] > 0
    assert "eval/math/pass_at_1" in seen[-1]
    # same seeds, same weights after every sync: the same rollouts and losses as colocated
    for m, c in zip(seen, runs["colocated"][1], strict=True):
        for key in ("rl/response_tokens", "rl/reward_mean", "rl/truncated_rate"):
            assert m[key] == c[key], key
        assert m["rl/loss"] == pytest.approx(c["rl/loss"], abs=1e-4)
    assert seen[-1]["eval/math/pass_at_1"] == runs["colocated"][1][-1]["eval/math/pass_at_1"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_engine_fails_the_run_fast_with_one_line(tmp_path):
    from k2_rl.engine_process import EngineProcessError
    from k2_rl.rl_stage import RLTrainer

    init, _ = save_tiny_checkpoint(tmp_path / "init")
    trainer = RLTrainer(_rl_cfg(init, tmp_path / "rl", "process"))
    proc = trainer.engine._process
    os.kill(trainer.engine.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineProcessError, match=r"killed by signal 9\) died during") as err:
        trainer.train()
    assert time.monotonic() - t0 < 5.0  # far inside the 600 s timeout: death is seen at once
    assert "\n" not in str(err.value)
    assert _gone(proc) and not dist.is_initialized()


def test_engine_option_is_validated():
    from k2_rl.options import RlOptions

    assert RlOptions(init="x").engine == "colocated"
    opts = RlOptions(init="x", engine="process", engine_timeout_s=5, sync_bucket_mb=4)
    assert opts.engine == "process" and opts.engine_timeout_s == 5
    with pytest.raises(ValueError, match="engine"):
        RlOptions(init="x", engine="ray")
    with pytest.raises(ValueError, match="engine_timeout_s"):
        RlOptions(init="x", engine_timeout_s=0)
