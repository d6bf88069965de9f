"""`plugins.rl.engine=openai`: rollouts and weight updates through a real `k2 serve` on 127.0.0.1.

Tolerance of the log-probability equality: 1e-4. The server and the trainer run the same
float32 model code on CPU; they differ only in how the sums are ordered (the server decodes
token by token from its KV cache in batches of other requests, the trainer scores the whole
sequence in one forward), which moves a log-probability by ~1e-6, two orders below the bound.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from rl_fixtures import ENDPOINT_RL_SMALL, save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from serve_fixture import start_server, stop_server  # noqa: E402

KEY = "test-key-openai-engine"
KEY_ENV = "K2_TEST_OPENAI_ENGINE_KEY"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(k2 serve process, base URL, init checkpoint URI, weights root) for the module."""
    root = tmp_path_factory.mktemp("openai-engine")
    init, _ = save_tiny_checkpoint(root / "init")
    proc, base = start_server(
        init, "--weights-root", str(root), "--max-batch-size", "16", env={"K2_SERVE_API_KEY": KEY}
    )
    yield proc, base, init, root
    stop_server(proc)


def _rl_cfg(init, run_dir, base, steps=2, extra=()):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path

    return load_config(
        config_path("rl-math"),
        [
            f"plugins.rl.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={steps}",
            "plugins.rl.engine=openai",
            f"plugins.rl.openai.base_url={base}/v1",
            f"plugins.rl.openai.api_key_env={KEY_ENV}",
            "plugins.rl.openai.concurrency=8",
            "plugins.rl.openai.logprob_tolerance=1e-4",
            *ENDPOINT_RL_SMALL,
            *extra,
        ],
    )


def _health(base):
    return httpx.get(f"{base}/health", timeout=10).json()


def _trainer_lps(model, traj):
    from k2_rl.engine_openai import trainer_logprobs

    return trainer_logprobs(model, traj.prompt_ids, traj.token_ids)


def test_one_rl_iteration_through_k2_serve_with_a_weight_update(served, tmp_path, monkeypatch):
    from k2_core.model import K2ForCausalLM
    from k2_rl.rl_stage import RLTrainer

    _, base, init, root = served
    monkeypatch.setenv(KEY_ENV, KEY)
    trainer = RLTrainer(_rl_cfg(init, root / "run1", base))
    try:
        # the start is an update too: the server now serves the trainer's step-0 weights
        assert trainer.engine.version == 0 and _health(base)["weights_version"] == 0
        old = K2ForCausalLM(trainer.cfg.model, trainer.cfg.moe, init_weights=False)
        old.load_state_dict(trainer.run.model.state_dict())
        m = trainer.iteration()
        assert trainer.engine.version == 1 and _health(base)["weights_version"] == 1
        assert m["rl/groups"] >= 1 and m["rollout/failed_samples"] == 0
        assert m["time/sync_s"] > 0 and trainer.sync.last_check <= TOL
        print(
            f"rollout through k2 serve: {m['rollout/tokens_per_s']:.0f} tokens/s, "
            f"update {m['time/sync_s']:.2f} s"
        )
        written = sorted(p.name for p in (root / "run1" / "engine-weights").iterdir())
        assert written == ["v00000000", "v00000001"]

        # the next rollout comes from the new weights: tagged 1, and its log-probabilities are
        # the updated trainer's, not the old weights'
        groups, stats = trainer.rollout(1.0)
        trajs = [t for g in groups for t in g] + list(trainer.rollouts.in_flight)
        trajs = [t for t in trajs if t.token_ids]
        assert trajs and stats.generated_tokens > 0
        worst_new = worst_old = 0.0
        for t in trajs:
            assert set(t.versions) == {1}
            new, prev = _trainer_lps(trainer.run.model, t), _trainer_lps(old, t)
            worst_new = max(
                worst_new, max(abs(a - b) for a, b in zip(t.logprobs, new, strict=True))
            )
            worst_old = max(
                worst_old, max(abs(a - b) for a, b in zip(t.logprobs, prev, strict=True))
            )
        print(
            f"logprob gap: {worst_new:.2g} (new weights), {worst_old:.2g} (old); check "
            f"{trainer.sync.last_check:.2g}"
        )
        assert worst_new <= TOL, worst_new  # the engine's logprobs equal the trainer's
        assert worst_old > 100 * TOL, worst_old  # and the update really changed them
    finally:
        trainer.close()


def test_a_stale_engine_fails_the_check_with_one_line(served, monkeypatch):
    from k2_core.modelio import load_model
    from k2_rl.engine_openai import OpenAIEngine, OpenAIEngineError, check_logprobs
    from k2_rl.options import OpenAIEngineOptions

    _, base, init, root = served
    monkeypatch.setenv(KEY_ENV, KEY)
    engine = OpenAIEngine(OpenAIEngineOptions(base_url=f"{base}/v1", api_key_env=KEY_ENV))
    try:
        model = load_model(init)
        engine.load_weights_from_disk(init, 7)
        engine._version = 7
        assert check_logprobs(engine, model, [[5, 6, 7]], 6, TOL) <= TOL
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)  # the trainer moved on; the engine did not
        with pytest.raises(OpenAIEngineError, match="differ from the trainer's") as err:
            check_logprobs(engine, model, [[5, 6, 7]], 6, TOL)
        assert "\n" not in str(err.value)
    finally:
        engine.close()


def test_weight_updates_only_from_the_roots_and_with_the_key(served, tmp_path):
    _, base, init, root = served
    url = f"{base}/update_weights_from_disk"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={"model_path": str(tmp_path / "elsewhere")}, headers=auth, timeout=30)
    assert r.status_code == 403
    msg = r.json()["error"]["message"]
    assert "outside the server's weight roots" in msg and "\n" not in msg
    escape = f"{root}/../{tmp_path.name}"
    assert httpx.post(url, json={"model_path": escape}, headers=auth, timeout=30).status_code == 403
    assert httpx.post(url, json={"model_path": init}, timeout=30).status_code == 401
    r = httpx.post(url, json={"model_path": str(root / "missing")}, headers=auth, timeout=30)
    assert r.status_code == 400 and "cannot read the checkpoint" in r.json()["error"]["message"]
    before = _health(base)["weights_version"]
    r = httpx.post(url, json={"model_path": init}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["weights_version"] == before + 1
    out = httpx.post(
        f"{base}/v1/completions",
        headers=auth,
        timeout=60,
        json={"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, "logprobs": 0},
    ).json()
    assert (
        out["weights_version"] == before + 1 and out["choices"][0]["weights_version"] == before + 1
    )


# long enough to be still decoding when the update lands, on an idle box too (300 tokens were
# not: decode got faster and the completion ended before the update was sent); the model's
# positions end at 1024
LONG = 1000


def test_a_generation_in_flight_finishes_on_its_version(served):
    """k2 serve switches weights between engine batches: a long completion running when the
    update arrives keeps the old weights and says so; the next one runs on the new weights."""
    from k2_core.modelio import load_model, save_model
    from k2_rl.engine_openai import parse_completion, trainer_logprobs

    _, base, init, root = served
    auth = {"Authorization": f"Bearer {KEY}"}
    old = load_model(init)
    new = load_model(init)
    with torch.no_grad():
        new.lm_head.weight.mul_(1.5)
    save_model(new, str(root / "scaled"))
    url = f"{base}/update_weights_from_disk"
    v0 = httpx.post(url, json={"model_path": init}, headers=auth, timeout=60).json()[
        "weights_version"
    ]
    prompt = [5, 6, 7]
    got = {}

    def long_completion():
        got["long"] = httpx.post(
            f"{base}/v1/completions",
            headers=auth,
            timeout=120,
            json={
                "prompt": prompt,
                "max_tokens": LONG,
                "temperature": 1.0,
                "seed": 3,
                "logprobs": 0,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
        ).json()
        got["long_end"] = time.monotonic()

    t = threading.Thread(target=long_completion)
    t.start()
    deadline = time.monotonic() + 30
    while _health(base)["pending"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # it is decoding now
    sent = time.monotonic()
    r = httpx.post(url, json={"model_path": str(root / "scaled")}, headers=auth, timeout=120)
    t.join()
    assert got["long_end"] > sent  # the update really arrived while it was generating
    assert r.status_code == 200 and r.json()["weights_version"] == v0 + 1
    choice = got["long"]["choices"][0]
    assert choice["weights_version"] == v0  # finished on the version it started with
    ids, lps = parse_completion(choice, "k2 serve")
    assert len(ids) == LONG
    assert (
        max(abs(a - b) for a, b in zip(lps, trainer_logprobs(old, prompt, ids), strict=True)) <= TOL
    )
    after = httpx.post(
        f"{base}/v1/completions",
        headers=auth,
        timeout=60,
        json={
            "prompt": prompt,
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
    ).json()["choices"][0]
    assert after["weights_version"] == v0 + 1
    ids, lps = parse_completion(after, "k2 serve")
    assert (
        max(abs(a - b) for a, b in zip(lps, trainer_logprobs(new, prompt, ids), strict=True)) <= TOL
    )


def test_weight_loader_refusals():
    from k2_data.inference.weights import WeightLoader, within_roots

    assert within_roots("/a/b/c", ["/a/b"]) and within_roots("file:///a/b", ["/a/b"])
    assert not within_roots("/a/bc", ["/a/b"]) and not within_roots("/a/b/../x", ["/a/b"])
    assert within_roots("s3://bkt/runs/v1", ["s3://bkt/runs"])
    assert not within_roots("s3://bkt/runs/../x", ["s3://bkt/runs"])
    assert not within_roots("memory://bkt/runs/v1", ["s3://bkt/runs"])
    assert "API key" in WeightLoader(None, ("/a",), has_api_key=False).refusal("/a/x")
    assert "--weights-root" in WeightLoader(None, (), has_api_key=True).refusal("/a/x")
    assert WeightLoader(None, ("/a",), has_api_key=True).refusal("/a/x") is None


def test_update_pauses_new_requests_and_drains_those_in_flight(served, monkeypatch):
    from k2_data.inference.engine import SamplingParams
    from k2_rl.engine_openai import OpenAIEngine
    from k2_rl.options import OpenAIEngineOptions

    _, base, _, _ = served
    monkeypatch.setenv(KEY_ENV, KEY)
    engine = OpenAIEngine(
        OpenAIEngineOptions(base_url=f"{base}/v1", api_key_env=KEY_ENV, concurrency=4), version=3
    )
    got: dict[str, object] = {}
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=120, ignore_eos=True, seed=1)
        first = threading.Thread(
            target=lambda: got.__setitem__(
                "first", [c.version for c in engine.generate([[5, 6, 7]] * 3, params)]
            )
        )
        first.start()
        deadline = time.monotonic() + 30
        while engine._in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine._in_flight == 3

        def load():
            # drained: the 3 requests in flight have all come back, and nothing else was sent
            got["at_load"] = (engine._in_flight, engine.requests)
            later.start()  # a request made during the update waits for it
            time.sleep(0.3)
            got["sent_during_load"] = engine.requests - 3

        later = threading.Thread(
            target=lambda: got.__setitem__(
                "later", engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))[0].version
            )
        )
        engine.update(load, 4)
        first.join()
        later.join()
        assert got["at_load"] == (0, 3) and got["sent_during_load"] == 0
        assert got["first"] == [3, 3, 3]  # tagged with the version live when each was sent
        assert got["later"] == 4 and engine.requests == 4
    finally:
        engine.close()


class _FlakyEngine:
    """A pytest-httpserver handler: valid k2-like completions, except that the first sample of
    the prompt starting with `bad` fails with 503 every time (its retries carry its seed)."""

    def __init__(self, bad: int, logprobs: bool = True):
        self.bad, self.logprobs, self.failing_seed, self.calls = bad, logprobs, None, 0

    def __call__(self, request):
        from werkzeug import Response

        body = json.loads(request.data)
        self.calls += 1
        if body["prompt"][0] == self.bad and self.failing_seed in (None, body.get("seed")):
            self.failing_seed = body.get("seed")
            return Response("overloaded", status=503)
        n = min(3, body["max_tokens"])
        lp = {
            "tokens": [f"token_id:{10 + i}" for i in range(n)],
            "token_logprobs": [-0.5] * n,
            "top_logprobs": None,
            "text_offset": [0] * n,
        }
        choice = {
            "index": 0,
            "text": "abc",
            "finish_reason": "stop",
            "logprobs": lp if self.logprobs else None,
        }
        return Response(json.dumps({"choices": [choice]}), content_type="application/json")


def _engine_at(httpserver, handler, **kw):
    from k2_rl.engine_openai import OpenAIEngine
    from k2_rl.options import OpenAIEngineOptions

    httpserver.expect_request("/v1/completions", method="POST").respond_with_handler(handler)
    opts = OpenAIEngineOptions(
        base_url=httpserver.url_for("/v1"), model="m", retry_backoff_s=0.01, **kw
    )
    return OpenAIEngine(opts)


def test_a_sample_failing_after_its_retries_leaves_its_group_and_is_counted(httpserver):
    from k2_data.inference.engine import SamplingParams
    from k2_rl.rollout import RolloutManager, RolloutStats
    from k2_rl.weight_sync import VersionGate

    handler = _FlakyEngine(bad=2)
    engine = _engine_at(httpserver, handler, retries=2)
    try:
        rm = RolloutManager(
            engine,
            lambda **kw: SamplingParams(**kw),
            k=3,
            segment_tokens=None,
            gate=VersionGate(1),
            partial=False,
        )
        stats = RolloutStats()
        prompts = iter([({"q": 1}, [1, 5], "math", 8), ({"q": 2}, [2, 5], "math", 8)])
        rm.add_prompts(prompts, 2, stats)
        groups = rm.step(1.0, 123, stats)
        sizes = sorted(len(g) for g in groups)
        assert sizes == [2, 3]  # the failed sample left its group; the group still trains
        assert stats.failed_samples == 1 and engine.failed_samples == 1
        assert engine.retries == 2 and handler.calls == 5 + 3  # 5 good + 1 x (1 + 2 retries)
        assert not rm.in_flight
    finally:
        engine.close()


def test_an_engine_that_is_down_fails_the_run_with_one_line():
    from k2_data.inference.engine import SamplingParams
    from k2_rl.engine_openai import OpenAIEngine, OpenAIEngineError
    from k2_rl.options import OpenAIEngineOptions
    from serve_fixture import free_port

    engine = OpenAIEngine(
        OpenAIEngineOptions(
            base_url=f"http://127.0.0.1:{free_port()}/v1",
            model="m",
            retries=1,
            retry_backoff_s=0.01,
            concurrency=4,
            max_consecutive_failures=6,
        )
    )
    try:
        outs = engine.generate([[1, 2]] * 5, SamplingParams(max_new_tokens=4))
        assert [o.finish_reason for o in outs] == ["failed"] * 5  # excluded, not yet fatal
        with pytest.raises(OpenAIEngineError, match="failed 7 samples in a row") as err:
            engine.generate([[1, 2]] * 2, SamplingParams(max_new_tokens=4))
        assert "ConnectError" in str(err.value) and "\n" not in str(err.value)
    finally:
        engine.close()


def test_a_completion_without_logprobs_is_refused(httpserver):
    from k2_data.inference.engine import SamplingParams
    from k2_rl.engine_openai import OpenAIEngineError

    engine = _engine_at(httpserver, _FlakyEngine(bad=-1, logprobs=False))
    try:
        with pytest.raises(OpenAIEngineError, match="without log-probabilities") as err:
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=4))
        assert "\n" not in str(err.value)
    finally:
        engine.close()


def test_k2_serve_without_logprobs_in_the_request_is_refused_by_the_parser(served):
    from k2_rl.engine_openai import OpenAIEngineError, parse_completion

    _, base, _, _ = served
    out = httpx.post(
        f"{base}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"prompt": [5, 6], "max_tokens": 2},
    ).json()
    with pytest.raises(OpenAIEngineError, match="without log-probabilities"):
        parse_completion(out["choices"][0], "k2 serve")


def test_openai_options_are_validated():
    from k2_rl.options import RlOptions

    opts = RlOptions(
        init="x",
        engine="openai",
        openai={"base_url": "http://h:1/v1", "concurrency": 4, "retries": 0},
    )
    assert opts.openai.concurrency == 4 and opts.openai.weight_update == "k2"
    with pytest.raises(ValueError, match="concurrency"):
        RlOptions(init="x", engine="openai", openai={"concurrency": 0})
    assert (
        RlOptions(
            init="x", engine="openai", openai={"weight_update": "vllm"}
        ).openai.restart_command
        is None
    )
    with pytest.raises(ValueError, match="weight_update"):
        RlOptions(init="x", engine="openai", openai={"weight_update": "tgi"})


def test_a_relative_weights_dir_is_sent_to_the_server_absolute(tmp_path, monkeypatch):
    """k2 serve resolves a relative path against its own cwd, not the trainer's."""
    from types import SimpleNamespace

    from k2_rl.engine_openai import OpenAISync
    from k2_rl.options import OpenAIEngineOptions

    monkeypatch.chdir(tmp_path)
    fake = SimpleNamespace(opts=OpenAIEngineOptions())
    assert OpenAISync(fake, "runs/x/engine-weights", []).weights_dir == str(
        tmp_path / "runs/x/engine-weights"
    )
    assert OpenAISync(fake, "s3://bkt/w/", []).weights_dir == "s3://bkt/w"


# --- weight_update=vllm (the real vLLM runs in test_vllm_engine.py, a slow test) ---------------
class _FakeVllm:
    """The OpenAIEngine surface OpenAISync uses, recording the calls."""

    def __init__(self, tokenizer, refuse=False, **opts):
        from k2_rl.options import OpenAIEngineOptions

        self.opts = OpenAIEngineOptions(weight_update="vllm", restart_timeout_s=30, **opts)
        self.tokenizer, self.calls, self.refuse = tokenizer, [], refuse

    def update(self, load, version):
        load()

    def reload_vllm(self, uri):
        from k2_rl.engine_openai import OpenAIEngineError

        self.calls.append(("reload", uri))
        if self.refuse:
            raise OpenAIEngineError("vLLM reload refused by http://h/collective_rpc (500): ...")

    def wait_ready(self, timeout_s):
        self.calls.append(("ready", timeout_s))


@pytest.fixture
def stale_once(monkeypatch):
    """check_logprobs fails its first call (a stale reload), then passes."""
    import k2_rl.engine_openai as eo

    seen = []

    def check(engine, model, prompts, n, tol, version=None):
        seen.append(version)
        if len(seen) == 1:
            raise eo.OpenAIEngineError("the engine's log-probabilities differ from the trainer's")
        return 1e-7

    monkeypatch.setattr(eo, "check_logprobs", check)
    return seen


def _tiny_model_and_tok():
    from k2_core.model import K2ForCausalLM
    from rl_fixtures import tiny_configs, tiny_tokenizer

    tok = tiny_tokenizer(vocab=300)
    return K2ForCausalLM(*tiny_configs(tok.vocab_size)), tok


def test_vllm_update_reloads_then_restarts_when_the_check_fails(tmp_path, stale_once):
    from k2_rl.engine_openai import OpenAISync

    model, tok = _tiny_model_and_tok()
    marker = tmp_path / "restarted"
    engine = _FakeVllm(tok, restart_command=f"echo {{model_path}} > {marker}")
    sync = OpenAISync(engine, str(tmp_path / "w dir"), [[5, 6]])
    sync.push(model, 3)
    uri = str(tmp_path / "w dir" / "v00000003")
    assert engine.calls[0] == ("reload", uri) and engine.calls[1][0] == "ready"
    assert marker.read_text().strip() == uri  # quoted for the shell: the space survived
    assert sync.restarts == 1 and stale_once == [3, 3] and sync.last_check == 1e-7
    # an HF folder vLLM can be (re)started on: config, weights, tokenizer, chat template
    names = {p.name for p in Path(uri).iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template" in json.loads((Path(uri) / "tokenizer_config.json").read_text())


def test_vllm_update_without_a_restart_command_fails_with_one_line(tmp_path, stale_once):
    from k2_rl.engine_openai import OpenAIEngineError, OpenAISync

    model, tok = _tiny_model_and_tok()
    engine = _FakeVllm(tok)
    with pytest.raises(OpenAIEngineError, match="weight update to version 1 .*differ") as err:
        OpenAISync(engine, str(tmp_path), [[5, 6]]).push(model, 1)
    assert "\n" not in str(err.value) and [c[0] for c in engine.calls] == ["reload"]


def test_vllm_restart_command_failing_fails_the_update_with_its_last_line(tmp_path, stale_once):
    from k2_rl.engine_openai import OpenAIEngineError, OpenAISync

    model, tok = _tiny_model_and_tok()
    engine = _FakeVllm(tok, restart_command="echo starting; echo 'no GPU, no luck' >&2; exit 3")
    with pytest.raises(OpenAIEngineError, match="restart_command exited with 3: no GPU, no luck"):
        OpenAISync(engine, str(tmp_path), [[5, 6]]).push(model, 1)


def test_vllm_reload_route_missing_says_to_enable_dev_mode(httpserver):
    from k2_rl.engine_openai import OpenAIEngine, OpenAIEngineError
    from k2_rl.options import OpenAIEngineOptions

    got = []

    def handler(request):
        from werkzeug import Response

        got.append(json.loads(request.data))
        return Response(json.dumps({"results": [None]}), content_type="application/json")

    httpserver.expect_request("/collective_rpc", method="POST").respond_with_handler(handler)
    engine = OpenAIEngine(
        OpenAIEngineOptions(base_url=httpserver.url_for("/v1"), model="m", weight_update="vllm")
    )
    try:
        engine.reload_vllm("/w/v00000001")
        assert got[0]["method"] == "reload_weights"
        assert got[0]["kwargs"] == {"weights_path": "/w/v00000001"}
        httpserver.clear()
        httpserver.expect_request("/collective_rpc").respond_with_data("Not Found", status=404)
        with pytest.raises(OpenAIEngineError, match="VLLM_SERVER_DEV_MODE=1") as err:
            engine.reload_vllm("/w/v00000002")
        assert "\n" not in str(err.value)
    finally:
        engine.close()


def test_vllm_reload_refused_falls_back_to_the_restart(tmp_path, monkeypatch):
    import k2_rl.engine_openai as eo

    monkeypatch.setattr(eo, "check_logprobs", lambda *a, **k: 2e-7)
    model, tok = _tiny_model_and_tok()
    engine = _FakeVllm(tok, refuse=True, restart_command="true {model_path}")
    sync = eo.OpenAISync(engine, str(tmp_path), [[5, 6]])
    sync.push(model, 2)
    assert [c[0] for c in engine.calls] == ["reload", "ready"] and sync.restarts == 1
    with pytest.raises(eo.OpenAIEngineError, match="version 2 .*refused by"):
        eo.OpenAISync(_FakeVllm(tok, refuse=True), str(tmp_path / "b"), [[5, 6]]).push(model, 2)
