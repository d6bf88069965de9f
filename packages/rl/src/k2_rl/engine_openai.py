"""Rollouts from a running OpenAI-compatible engine (`plugins.rl.engine=openai`).

`OpenAIEngine` serves the `Engine` surface the RL stage uses (`generate`, `version`,
`default_stop_ids`) over HTTP: one POST /v1/completions per sample, the prompt as token ids,
`logprobs: 0` and `return_tokens_as_token_ids` so the sampled ids and their raw
log-probabilities come back (k2 serve; vLLM with `--logprobs-mode raw_logprobs`; SGLang), up
to `concurrency` requests at once from a thread pool over one httpx client.

OpenAI responses carry no policy version, so the trainer owns it: every completion is tagged
with the version live when it was requested, and `update` is pause new requests -> drain those
in flight -> load (and check) -> resume. A completion without log-probabilities is refused
with the reason (the K1.5 log-ratio needs them); a sample whose request still fails after
`retries` comes back with finish_reason "failed" and the rollout excludes it from its group.

`OpenAISync` is the weight sync (InProcessSync's surface): it writes the new version under
`weights_dir`, asks the engine to load it (POST /update_weights_from_disk: k2 serve reads the
k2 checkpoint; SGLang an HF export; vLLM, weight_update=vllm: POST /collective_rpc
reload_weights of an HF export, a development route), and compares a few greedy tokens'
log-probabilities from the engine with the trainer's own before the engine takes new requests
again. For vLLM a failed check runs `restart_command` (restart the server on the new export)
and checks again: vLLM 0.32's in-place CPU reload serves wrong weights on MoE models (K2's).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from k2_core.errors import ConfigError, K2Error
from k2_data.inference.engine import Completion, SamplingParams

from .options import OpenAIEngineOptions
from .weight_sync import state_bytes, sync_state

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FAILED = "failed"  # finish_reason of a sample that failed after its retries


class OpenAIEngineError(K2Error):
    """The OpenAI-compatible engine refused, answered without what RL needs, or a weight
    update failed."""

    kind = "rl"


class _Retryable(Exception):
    """A request failure worth another try (connection, timeout, 408/429/5xx)."""


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _error_message(resp: Any) -> str:
    try:
        body = resp.json()
        msg = (
            body.get("error", {}).get("message")
            if isinstance(body.get("error"), dict)
            else body.get("error") or body.get("message") or body.get("detail")
        )
    except ValueError:
        msg = resp.text
    return _first_line(str(msg or resp.reason_phrase))


def parse_completion(choice: dict[str, Any], where: str) -> tuple[list[int], list[float]]:
    """(token ids, raw log-probabilities) of one /v1/completions choice; OpenAIEngineError
    with the reason when the engine left out what the RL objective needs."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or lp.get("token_logprobs") is None or lp.get("tokens") is None:
        raise OpenAIEngineError(
            f"{where} returned a completion without log-probabilities (choices[].logprobs is "
            "empty); RL needs the sampling policy's log-probability of every token: use an "
            "engine that returns them on /v1/completions (k2 serve; vLLM with --logprobs-mode "
            "raw_logprobs)"
        )
    tokens, lps = lp["tokens"], lp["token_logprobs"]
    ids = []
    for tok in tokens:
        if not (isinstance(tok, str) and tok.startswith("token_id:")):
            raise OpenAIEngineError(
                f"{where} returned tokens as text ({tok!r}), not as 'token_id:N': the engine "
                "must support return_tokens_as_token_ids (k2 serve, vLLM do)"
            )
        ids.append(int(tok[len("token_id:") :]))
    if len(lps) != len(ids) or any(x is None for x in lps):
        raise OpenAIEngineError(
            f"{where} returned {len(ids)} tokens but log-probabilities for "
            f"{sum(x is not None for x in lps)} of them"
        )
    return ids, [float(x) for x in lps]


class OpenAIEngine:
    """The rollout engine behind an OpenAI-compatible /v1/completions API (see module doc)."""

    def __init__(
        self,
        opts: OpenAIEngineOptions,
        *,
        tokenizer: Any = None,
        version: int = 0,
        check_served_version: bool = False,
    ):
        import httpx

        self.opts = opts
        self.tokenizer = tokenizer
        self.base_url = opts.base_url.rstrip("/")
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        headers = {}
        self.api_key: str | None = None
        if opts.api_key_env:
            key = os.environ.get(opts.api_key_env)
            if not key:
                raise ConfigError(
                    f"plugins.rl.openai.api_key_env: ${opts.api_key_env} is not "
                    "set (it should hold the engine's API key)"
                )
            headers["Authorization"] = f"Bearer {key}"
            self.api_key = key
        if opts.weight_update == "k2-push" and not (opts.push_address and self.api_key):
            raise ConfigError(
                "plugins.rl.openai.push_address: weight_update=k2-push needs the "
                "server's push listener (HOST:PORT of k2 serve --push-port) and "
                "its API key (api_key_env)"
            )
        self.client = httpx.Client(
            timeout=opts.timeout_s,
            headers=headers,
            limits=httpx.Limits(
                max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency
            ),
        )
        self.pool = ThreadPoolExecutor(opts.concurrency, thread_name_prefix="k2-rl-openai")
        self.check_served_version = check_served_version
        self._version = int(version)
        self._cond = threading.Condition()
        self._paused = False
        self._in_flight = 0
        self._closed = False
        self.failed_samples = 0  # samples given up after their retries (cumulative)
        self.consecutive_failures = 0  # reset by any sample that succeeds
        self.last_error = ""
        self.retries = 0  # retried requests (cumulative)
        self.requests = 0
        self.default_stop_ids: list[int] = []
        if tokenizer is not None:
            from k2_data.inference.engine import IM_END
            from k2_data.tokenizer import EOS

            special = tokenizer.special_tokens
            self.default_stop_ids = [special[t] for t in (IM_END, EOS) if t in special]
        try:
            self.model = opts.model or self._first_model()
        except BaseException:
            self.close()
            raise

    # --- the Engine surface ----------------------------------------------------------------
    @property
    def version(self) -> int:
        """The policy version the engine serves (owned by the trainer)."""
        return self._version

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Complete every prompt (one request each, `concurrency` at a time); results in prompt
        order, each tagged with the version live when it was requested. A sample that failed
        after its retries has finish_reason "failed" and no tokens."""
        plist = (
            list(params)
            if isinstance(params, list)
            else [params or SamplingParams()] * len(prompts)
        )
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        futs = [
            self.pool.submit(self._sample, list(p), sp)
            for p, sp in zip(prompts, plist, strict=True)
        ]
        outs = [f.result() for f in futs]
        if self.consecutive_failures >= self.opts.max_consecutive_failures:
            raise OpenAIEngineError(
                f"the engine at {self.base_url} failed {self.consecutive_failures} samples in a "
                f"row, each after {self.opts.retries} retries (last: {self.last_error}); is it "
                "down? (plugins.rl.openai.max_consecutive_failures)"
            )
        return outs

    def update(self, load: Any, version: int) -> None:
        """Pause new requests, drain those in flight, run `load()`, then serve `version` and
        resume; when `load` raises, the previous version stays and requests resume."""
        with self._cond:
            self._paused = True
            try:
                if not self._cond.wait_for(lambda: self._in_flight == 0, self.opts.timeout_s):
                    raise OpenAIEngineError(
                        f"{self._in_flight} requests to {self.base_url} still in flight after "
                        f"{self.opts.timeout_s:g} s (plugins.rl.openai.timeout_s); update aborted"
                    )
            except BaseException:
                self._paused = False
                self._cond.notify_all()
                raise
        try:
            load()
            self._version = int(version)
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the request threads and the HTTP client (idempotent)."""
        if not self._closed:
            self._closed = True
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.client.close()

    # --- requests ----------------------------------------------------------------------------
    def _first_model(self) -> str:
        import httpx

        try:
            resp = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise OpenAIEngineError(
                f"cannot reach the engine at {self.base_url} "
                f"({type(exc).__name__}: {_first_line(str(exc))}); start it "
                "or fix plugins.rl.openai.base_url"
            ) from None
        if resp.status_code != 200:
            raise OpenAIEngineError(
                f"{self.base_url}/models answered {resp.status_code}: {_error_message(resp)}"
            )
        data = resp.json().get("data") or []
        if not data:
            raise OpenAIEngineError(
                f"{self.base_url}/models lists no model; set plugins.rl.openai.model"
            )
        return str(data[0]["id"])

    def _sample(self, prompt: list[int], params: SamplingParams) -> Completion:
        """One sample through the pause gate, tagged with the version live at its request."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused)
            self._in_flight += 1
            version = self._version
        try:
            return self.complete(prompt, params, version)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def body(self, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
        """The /v1/completions request of one sample."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(params.max_new_tokens),
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.seed is not None:
            body["seed"] = int(params.seed) & ((1 << 63) - 1)  # engines take a signed int64
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:
            body["ignore_eos"] = True
        return body

    def complete(self, prompt: list[int], params: SamplingParams, version: int) -> Completion:
        """POST one sample with retries; a Completion (finish_reason "failed" when it gave up)."""
        delay = self.opts.retry_backoff_s
        for attempt in range(self.opts.retries + 1):
            try:
                out = self._post(prompt, params, version)
                with self._cond:
                    self.consecutive_failures = 0
                return out
            except _Retryable as exc:
                with self._cond:
                    self.last_error = _first_line(str(exc))
                if attempt == self.opts.retries:
                    break
                with self._cond:
                    self.retries += 1
                time.sleep(delay)
                delay *= 2
        with self._cond:
            self.failed_samples += 1
            self.consecutive_failures += 1
        return Completion(
            prompt_ids=prompt,
            token_ids=[],
            logprobs=[],
            finish_reason=FAILED,
            text=None,
            version=version,
        )

    def _post(self, prompt: list[int], params: SamplingParams, version: int) -> Completion:
        import httpx

        where = f"the engine at {self.base_url}"
        with self._cond:
            self.requests += 1
        try:
            resp = self.client.post(f"{self.base_url}/completions", json=self.body(prompt, params))
        except httpx.HTTPError as exc:
            raise _Retryable(f"{type(exc).__name__}: {_first_line(str(exc))}") from None
        if resp.status_code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}: {_error_message(resp)}")
        if resp.status_code != 200:
            raise OpenAIEngineError(
                f"{where} refused a completion with {resp.status_code}: {_error_message(resp)}"
            )
        try:
            choice = resp.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed response") from None
        ids, lps = parse_completion(choice, where)
        served = choice.get("weights_version")
        if self.check_served_version and served is not None and int(served) != version:
            raise OpenAIEngineError(
                f"{where} sampled with weights version {served} while the "
                f"trainer's live version is {version}"
            )
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        text = (
            self.tokenizer.decode([i for i in ids if i not in self.default_stop_ids])
            if self.tokenizer is not None
            else choice.get("text")
        )
        return Completion(
            prompt_ids=prompt,
            token_ids=ids,
            logprobs=lps,
            finish_reason=finish,
            text=text,
            version=version,
        )

    def greedy_logprobs(
        self, prompts: list[list[int]], n_tokens: int, version: int
    ) -> list[tuple[list[int], list[float]]]:
        """(token ids, log-probabilities) of `n_tokens` greedy tokens per prompt from weights
        `version`, bypassing the pause gate (the update's own check); errors raise."""
        params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, ignore_eos=True)
        out = []
        for p in prompts:
            try:
                c = self._post(list(p), params, version)
            except _Retryable as exc:
                raise OpenAIEngineError(
                    f"the engine at {self.base_url} failed a check request "
                    f"({_first_line(str(exc))})"
                ) from None
            out.append((c.token_ids, c.logprobs))
        return out

    def reload_vllm(self, uri: str) -> None:
        """vLLM: POST /collective_rpc reload_weights from the HF folder `uri` (a development
        route: the server needs VLLM_SERVER_DEV_MODE=1); one line on a refusal."""
        import httpx

        url = f"{self.root_url}/collective_rpc"
        body = {
            "method": "reload_weights",
            "kwargs": {"weights_path": uri},
            "timeout": self.opts.timeout_s,
        }
        try:
            resp = self.client.post(url, json=body, timeout=self.opts.timeout_s)
        except httpx.HTTPError as exc:
            raise OpenAIEngineError(
                f"vLLM reload at {url} failed ({type(exc).__name__}: {_first_line(str(exc))})"
            ) from None
        if resp.status_code == 404:
            raise OpenAIEngineError(
                f"{url} is not found: start vLLM with VLLM_SERVER_DEV_MODE=1 "
                "for its reload route (or set a restart_command)"
            )
        if resp.status_code != 200:
            raise OpenAIEngineError(
                f"vLLM reload refused by {url} ({resp.status_code}): {_error_message(resp)}"
            )

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until {base_url}/models answers 200 (a restarted engine is up)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client.get(f"{self.base_url}/models", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise OpenAIEngineError(
                    f"the engine at {self.base_url} did not answer /models "
                    f"within {timeout_s:g} s of its restart "
                    "(plugins.rl.openai.restart_timeout_s)"
                )
            time.sleep(1.0)

    def load_weights_from_disk(self, uri: str, version: int | None) -> dict[str, Any]:
        """POST /update_weights_from_disk (k2 serve and SGLang); one line on a refusal."""
        import httpx

        body: dict[str, Any] = {"model_path": uri}
        if version is not None:
            body["version"] = version
        url = f"{self.root_url}/update_weights_from_disk"
        try:
            resp = self.client.post(url, json=body, timeout=self.opts.timeout_s)
        except httpx.HTTPError as exc:
            raise OpenAIEngineError(
                f"weight update at {url} failed ({type(exc).__name__}: {_first_line(str(exc))})"
            ) from None
        if resp.status_code != 200:
            raise OpenAIEngineError(
                f"weight update refused by {url} ({resp.status_code}): {_error_message(resp)}"
            )
        data = resp.json()
        if data.get("success") is False:
            raise OpenAIEngineError(
                f"weight update failed at {url}: {_first_line(str(data.get('message', '')))}"
            )
        return data


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> list[float]:
    """log pi(token) of each of `tokens` after `prompt` under `model` (eval mode, float32)."""
    from .objective import token_logprobs

    was = model.training
    model.eval()
    try:
        ids = torch.tensor([list(prompt) + list(tokens)])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt) :] = True
        lp, _ = token_logprobs(model, ids, mask)
    finally:
        model.train(was)
    return lp[0, len(prompt) :].tolist()


def check_logprobs(
    engine: OpenAIEngine,
    model: torch.nn.Module,
    prompts: list[list[int]],
    n_tokens: int,
    tolerance: float,
    version: int | None = None,
) -> float:
    """Largest |engine - trainer| log-probability over greedy tokens of `prompts` (the engine
    serving `version`, default its current one); raises OpenAIEngineError (one line) above
    `tolerance`."""
    worst, n = 0.0, 0
    v = engine.version if version is None else version
    for p, (ids, lps) in zip(prompts, engine.greedy_logprobs(prompts, n_tokens, v), strict=True):
        mine = trainer_logprobs(model, p, ids)
        for a, b in zip(lps, mine, strict=True):
            worst, n = max(worst, abs(a - b)), n + 1
    if worst > tolerance:
        raise OpenAIEngineError(
            f"the engine's log-probabilities differ from the trainer's by up to {worst:.3g} "
            f"over {n} tokens (plugins.rl.openai.logprob_tolerance {tolerance:g}): it does not "
            "serve the trainer's weights (a stale reload?); restart it on the latest weights"
        )
    return worst


class OpenAISync:
    """Weight sync to an OpenAI-compatible engine (InProcessSync's surface): write, pause,
    drain, load, check, resume."""

    def __init__(self, engine: OpenAIEngine, weights_dir: str, check_prompts: list[list[int]]):
        from fsspec.core import split_protocol

        self.engine, self.opts = engine, engine.opts
        # a local path goes to the server absolute: it resolves paths against its own cwd
        local = split_protocol(weights_dir)[0] in (None, "file", "local")
        self.weights_dir = (
            os.path.abspath(split_protocol(weights_dir)[1]) if local else weights_dir.rstrip("/")
        )
        self.check_prompts = check_prompts
        self.written: list[str] = []
        self.last_seconds = 0.0
        self.last_bytes = 0
        self.last_check = 0.0  # largest logprob gap of the last check
        self.restarts = 0  # weight_update=vllm: reloads that failed the check, then restarted
        self.pushes = 0  # weight_update=k2-push: versions pushed

    def _push_buckets(self, model: torch.nn.Module, version: int) -> None:
        """weight_update=k2-push: pause, drain, push `model` to the server's push listener in
        checksummed buckets (the first push a full reload, later ones version + 1), check,
        resume; nothing is written to disk."""
        from k2_core.weight_push import WeightPusher, WeightPushError

        t0 = time.perf_counter()
        host, _, port = str(self.opts.push_address).rpartition(":")
        pusher = WeightPusher(
            [(host, int(port))],
            bucket_mb=self.opts.push_bucket_mb,
            timeout_s=self.opts.timeout_s,
            token=self.engine.api_key,
        )
        full = self.pushes == 0  # the server starts on other weights: no version to follow

        def load() -> None:
            try:
                pusher.push(model, version, full=full)
            except WeightPushError as exc:
                raise OpenAIEngineError(
                    f"weight push of version {version} to {self.opts.push_address}: {exc}"
                ) from None
            self.last_check = check_logprobs(
                self.engine,
                model,
                self.check_prompts,
                self.opts.check_tokens,
                self.opts.logprob_tolerance,
                version,
            )

        self.engine.update(load, version)
        self.pushes += 1
        self.last_seconds = time.perf_counter() - t0
        self.last_bytes = pusher.last.bytes

    def write(self, model: torch.nn.Module, version: int) -> str:
        """Write `model` as `version` where the engine can read it; returns its URI."""
        uri = f"{self.weights_dir}/v{version:08d}"
        if self.opts.weight_update in ("sglang", "vllm"):
            from k2_core.hf import save_pretrained

            save_pretrained(model, uri)
            if self.opts.weight_update == "vllm" and self.engine.tokenizer is not None:
                # a folder vLLM can also be (re)started on (restart_command)
                from pathlib import Path

                from k2_data.hf_export import hf_tokenizer_files

                files = hf_tokenizer_files(
                    self.engine.tokenizer, model.config.max_position_embeddings
                )
                for name, data in files.items():
                    (Path(uri) / name).write_bytes(data)
        else:
            from k2_core.modelio import save_model

            save_model(model, uri)
        return uri

    def push(self, model: torch.nn.Module, version: int) -> None:
        """Make `version` (= `model`'s weights) the engine's policy, checked, or raise."""
        if self.opts.weight_update == "k2-push":
            self._push_buckets(model, version)
            return
        t0 = time.perf_counter()
        uri = self.write(model, version)
        engine = self.engine

        def check() -> None:
            self.last_check = check_logprobs(
                engine,
                model,
                self.check_prompts,
                self.opts.check_tokens,
                self.opts.logprob_tolerance,
                version,
            )

        def load() -> None:
            fallback = self.opts.weight_update == "vllm" and bool(self.opts.restart_command)
            try:
                if self.opts.weight_update == "vllm":
                    engine.reload_vllm(uri)
                else:
                    sent = None if self.opts.weight_update == "sglang" else version
                    engine.load_weights_from_disk(uri, sent)
                check()
            except OpenAIEngineError as exc:
                if not fallback:
                    raise OpenAIEngineError(
                        f"weight update to version {version} ({uri}): {exc}"
                    ) from None
                # vLLM refused the reload or served wrong weights after it: restart it on
                # the new export and check again
                self.restart(uri)
                try:
                    check()
                except OpenAIEngineError as again:
                    raise OpenAIEngineError(
                        f"weight update to version {version} ({uri}), "
                        f"after restart_command: {again}"
                    ) from None

        engine.update(load, version)
        self.written.append(uri)
        self._prune()
        self.last_seconds = time.perf_counter() - t0
        self.last_bytes = state_bytes(sync_state(model))

    def restart(self, uri: str) -> None:
        """Run restart_command on the new export `uri` and wait for the engine to answer."""
        cmd = str(self.opts.restart_command).replace("{model_path}", shlex.quote(uri))
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                cmd, shell=True, capture_output=True, text=True, timeout=self.opts.restart_timeout_s
            )
        except subprocess.TimeoutExpired:
            raise OpenAIEngineError(
                f"restart_command ran past {self.opts.restart_timeout_s:g} s "
                "(plugins.rl.openai.restart_timeout_s)"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()
            raise OpenAIEngineError(
                f"restart_command exited with {done.returncode}: "
                f"{tail[-1] if tail else '(no output)'}"
            )
        self.engine.wait_ready(max(1.0, self.opts.restart_timeout_s - (time.monotonic() - t0)))
        self.restarts += 1

    def _prune(self) -> None:
        import fsspec

        while len(self.written) > self.opts.keep_weights:
            old = self.written.pop(0)
            fs, path = fsspec.core.url_to_fs(old)
            if fs.exists(path):
                fs.rm(path, recursive=True)
