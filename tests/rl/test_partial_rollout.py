"""Partial rollout: paused at the segment limit, resumed where it stopped, per-token versions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from k2_rl.rollout import RolloutManager, RolloutStats
from k2_rl.weight_sync import VersionGate

STOP = 3


@dataclass
class _Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class PrefixEngine:
    """A deterministic policy: the next token is a function of the whole prefix.

    A prompt [n, ...] asks for an answer of n tokens then STOP, so continuing a paused prefix
    gives exactly what an uninterrupted run gives.
    """

    def __init__(self):
        self.version = 0
        self.calls: list[int] = []

    def generate(self, prompts, params):
        out = []
        assert isinstance(params, list) and len(params) == len(prompts)
        params = params[0]
        self.calls.append(len(prompts))
        for p in prompts:
            want, toks = p[0], []
            prefix = list(p)
            while len(toks) < params["max_new_tokens"]:
                produced = len(prefix) - p.index(-1) - 1
                nxt = STOP if produced >= want else 10 + (sum(prefix) % 7)
                toks.append(nxt)
                prefix.append(nxt)
                if nxt == STOP:
                    break
            reason = "stop" if toks and toks[-1] == STOP else "length"
            out.append(_Completion(toks, [-0.5 - self.version] * len(toks), reason))
        return out


def _params(**kw):
    return kw


def _prompts(lengths):
    for n in lengths:
        yield {"q": n}, [n, 1, -1], "math", 100


def test_resumes_where_it_stopped_and_keeps_versions():
    eng = PrefixEngine()
    mgr = RolloutManager(eng, _params, k=2, segment_tokens=4, gate=VersionGate(5))
    st = RolloutStats()
    mgr.add_prompts(_prompts([9]), 1, st)
    done = []
    for it in range(3):
        eng.version = it
        done += mgr.step(1.0, None, st)
        if it < 2:
            assert not done and all(not t.finished for t in mgr.in_flight)
    assert len(done) == 1 and len(done[0]) == 2
    t = done[0][0]
    assert t.segments == 3 and t.finish_reason == "stop"
    assert t.versions == [0] * 4 + [1] * 4 + [2] * 2
    assert t.logprobs == [-0.5] * 4 + [-1.5] * 4 + [-2.5] * 2

    # the same prompt without a segment limit: identical tokens, one version
    ref_eng = PrefixEngine()
    ref = RolloutManager(ref_eng, _params, k=1, segment_tokens=None, gate=VersionGate(5))
    ref.add_prompts(_prompts([9]), 1, RolloutStats())
    (grp,) = ref.step(1.0, None, RolloutStats())
    assert grp[0].token_ids == t.token_ids and len(t.token_ids) == 10
    assert st.resumed == 4 and st.paused == 4 and st.generated_tokens == 20


def test_group_waits_for_all_members_and_state_round_trips():
    eng = PrefixEngine()
    mgr = RolloutManager(eng, _params, k=1, segment_tokens=4, gate=VersionGate(5))
    st = RolloutStats()
    mgr.add_prompts(_prompts([2, 7]), 2, st)
    first = mgr.step(1.0, None, st)
    assert [g[0].prompt["q"] for g in first] == [2]
    state = mgr.state_dict()
    again = RolloutManager(eng, _params, k=1, segment_tokens=4, gate=VersionGate(5))
    again.load_state_dict(state)
    assert again.groups_in_flight() == 1 and again.next_group == 2
    (grp,) = again.step(1.0, None, st)
    assert len(grp[0].token_ids) == 8 and grp[0].segments == 2


def test_budget_finishes_over_long_responses():
    eng = PrefixEngine()
    mgr = RolloutManager(eng, _params, k=1, segment_tokens=4, gate=VersionGate(5))
    st = RolloutStats()
    mgr.add_prompts(iter([({"q": 1}, [50, 1, -1], "math", 6)]), 1, st)
    assert mgr.step(1.0, None, st) == []
    (grp,) = mgr.step(1.0, None, st)
    assert grp[0].over_budget and len(grp[0].token_ids) == 6  # 4 then the 2 left


def test_stale_paused_groups_are_refused():
    eng = PrefixEngine()
    mgr = RolloutManager(eng, _params, k=2, segment_tokens=2, gate=VersionGate(1))
    st = RolloutStats()
    mgr.add_prompts(_prompts([20]), 1, st)
    mgr.step(1.0, None, st)
    eng.version = 1
    mgr.step(1.0, None, st)  # lag 1: accepted
    assert st.refused_groups == 0 and mgr.groups_in_flight() == 1
    eng.version = 2  # oldest token is from version 0: lag 2 > 1
    assert mgr.step(1.0, None, st) == []
    assert st.refused_groups == 1 and mgr.groups_in_flight() == 0


def test_with_the_engine_a_resumed_greedy_response_equals_an_uninterrupted_one():
    import torch
    from k2_core.model import K2ForCausalLM
    from k2_data.inference.engine import Engine, SamplingParams
    from rl_fixtures import tiny_configs, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    engine = Engine(K2ForCausalLM(*tiny_configs(tok.vocab_size)), tok)

    def params(*, temperature, max_new_tokens, seed):
        return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)

    prompt = tok.encode("What is 3 + 4?")
    paused = RolloutManager(engine, params, k=2, segment_tokens=5, gate=VersionGate(9))
    whole = RolloutManager(engine, params, k=2, segment_tokens=None, gate=VersionGate(9))
    for mgr in (paused, whole):
        mgr.add_prompts(iter([({"q": 0}, prompt, "math", 12)]), 1, RolloutStats())
    (ref,) = whole.step(1.0, 0, RolloutStats())
    got = []
    for it in range(3):
        engine.version = it
        got += paused.step(1.0, 0, RolloutStats())
    (grp,) = got
    assert grp[0].token_ids == ref[0].token_ids and grp[0].segments == 3
    assert grp[0].versions == [0] * 5 + [1] * 5 + [2] * 2
    assert grp[0].logprobs == pytest.approx(ref[0].logprobs, abs=1e-4)
