"""The rollout engine in a child process (`plugins.rl.engine=process`).

`RemoteEngine` starts a spawned child that builds the policy model from the run's config and
the tokenizer URI, and serves the `Engine` surface the RL stage uses (`generate`, `version`,
`default_stop_ids`) over a multiprocessing Pipe. Weights never cross the Pipe: the trainer
(rank 0) and the child (rank 1) form a 2-rank gloo group on 127.0.0.1 and every push, the
first one included, is `weight_sync.DistributedSync`'s bucketed broadcast. The child holds
exactly one policy version and tags each completion with it.

Failure handling: every wait on the child polls its liveness, so a dead child is reported
at once; a child that does not answer within `timeout_s` (the gloo group uses the same
timeout) is killed. Either way the trainer gets a one-line `EngineProcessError` and no
process is left behind; `close()` ends the child and the process group on a normal end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
from k2_core.errors import K2Error
from k2_data.inference.engine import Completion, Engine, SamplingParams

from .weight_sync import DistributedSync, sync_state

_POLL_S = 0.05  # how often a wait checks that the child is still alive
_CLOSE_GRACE_S = 5.0  # a child asked to exit gets this long before it is killed


class EngineProcessError(K2Error):
    """The rollout engine process could not start, died, hung or reported an error."""

    kind = "rl"


@dataclass
class VersionedCompletion(Completion):
    """A completion with the policy version of the weights that sampled it."""

    version: int = -1


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_meta(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor a push sends, in push order."""
    return [(n, tuple(t.shape), t.dtype) for n, t in sync_state(model).items()]


@dataclass(frozen=True)
class _ChildSpec:
    """Everything the child needs to build its engine and join the group (picklable)."""

    model_cfg: Any
    moe_cfg: Any
    tokenizer_uri: str | None
    meta: list[tuple[str, tuple[int, ...], torch.dtype]]
    max_batch_size: int
    threads: int
    port: int
    timeout_s: float
    bucket_mb: float


def _describe(exc: BaseException) -> str:
    """One line: exception type (unless a K2Error, which names its kind) and first message line."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, K2Error) else f"{type(exc).__name__}: {first}"


def _child_main(conn: Any, spec: _ChildSpec) -> None:
    """Entry point of the engine process: build, say hello, join the group, serve."""
    import torch.distributed as dist

    # the trainer decides when the engine ends (Ctrl-C reaches both; only the parent acts)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        from k2_core.model import K2ForCausalLM
        from k2_core.plugins import get_registry
        from k2_data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spec.tokenizer_uri) if spec.tokenizer_uri else None
        model = K2ForCausalLM(spec.model_cfg, spec.moe_cfg, get_registry(), init_weights=False)
        engine = Engine(model, tokenizer, max_batch_size=spec.max_batch_size)
        own = {n: tuple(t.shape) for n, t in sync_state(model).items()}
        theirs = {n: shape for n, shape, _ in spec.meta}
        if own != theirs:
            bad = sorted(set(own) ^ set(theirs)) or sorted(n for n in own if own[n] != theirs[n])
            raise ValueError(f"the engine's model differs from the trainer's at {bad[0]}")
        # meta tensors: the bucket plan only needs names, shapes and dtypes (the trainer's)
        template = {n: torch.empty(shape, dtype=dt, device="meta") for n, shape, dt in spec.meta}
        conn.send(("hello", os.getpid(), list(engine.default_stop_ids)))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{spec.port}",
            rank=1,
            world_size=2,
            timeout=timedelta(seconds=spec.timeout_s),
        )
    except Exception as exc:  # reported to the trainer, which raises it as one line
        conn.send(("error", _describe(exc)))
        return
    try:
        _serve(conn, engine, DistributedSync(src=0, bucket_mb=spec.bucket_mb), template)
    finally:
        dist.destroy_process_group()
        conn.close()


def _versioned(c: Completion, version: int) -> VersionedCompletion:
    return VersionedCompletion(
        **{f.name: getattr(c, f.name) for f in fields(c) if f.name != "version"}, version=version
    )


def _serve(conn: Any, engine: Engine, sync: DistributedSync, template: dict[str, Any]) -> None:
    """Answer requests until "close" or until the trainer's end of the Pipe goes away."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        kind = msg[0]
        if kind == "close":
            return
        try:
            if kind == "generate":
                outs = engine.generate(msg[1], msg[2])
                reply: tuple[Any, ...] = (
                    "ok",
                    [_versioned(c, engine.version) for c in outs],
                    engine.version,
                )
            elif kind == "load":
                version = sync.receive(engine, template)
                reply = ("ok", version, sync.last_bytes)
            else:
                reply = ("error", f"unknown request {kind!r}")
        except Exception as exc:
            fatal = kind == "load"  # a broken broadcast leaves the group unusable
            try:
                conn.send(("error", _describe(exc), type(exc).__name__))
            except OSError:
                return
            if fatal:
                return
            continue
        try:
            conn.send(reply)
        except OSError:
            return


class RemoteEngine:
    """An `Engine` in a spawned child process; weights arrive by gloo broadcast from here.

    `model` is the trainer's model: its weights are the child's first policy (`version`), and
    its state layout fixes the bucket plan of every later push (`push_weights`, or through
    `ProcessSync`). Close it (or use it as a context manager) to end the child.
    """

    def __init__(
        self,
        model_cfg: Any,
        moe_cfg: Any,
        tokenizer_uri: str | None,
        *,
        model: torch.nn.Module,
        version: int = 0,
        tokenizer: Any = None,
        max_batch_size: int = 64,
        timeout_s: float = 600.0,
        bucket_mb: float = 32.0,
        threads: int | None = None,
    ):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise EngineProcessError(
                "plugins.rl.engine=process: torch.distributed is already initialised in the "
                "trainer (a distributed backend?); use plugins.rl.engine=colocated"
            )
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.timeout_s = float(timeout_s)
        self.bucket_mb = float(bucket_mb)
        self.default_stop_ids: list[int] = []
        self._meta = _state_meta(model)
        self._version = -1
        self._closed = False
        self._owns_group = False
        self._lock = threading.Lock()
        self._dist = DistributedSync(src=0, bucket_mb=self.bucket_mb)
        port = _free_port()
        spec = _ChildSpec(
            model_cfg,
            moe_cfg,
            tokenizer_uri,
            self._meta,
            max_batch_size,
            threads or torch.get_num_threads(),
            port,
            self.timeout_s,
            self.bucket_mb,
        )
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_child_main, args=(child_conn, spec), name="k2-rl-engine", daemon=True
        )
        self._process.start()
        child_conn.close()  # only the child holds that end: its death shows here as EOF
        self.pid = self._process.pid
        try:
            self._start(dist, port, model, version)
        except BaseException:  # Ctrl-C or an error during the start: no child left behind
            self._shutdown(graceful=False)
            raise

    def _start(self, dist: Any, port: int, model: torch.nn.Module, version: int) -> None:
        """Wait for the child's hello, form the group, send the first weights."""
        _, stop_ids = self._receive("start")
        self.default_stop_ids = list(stop_ids)
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=0,
                world_size=2,
                timeout=timedelta(seconds=self.timeout_s),
            )
        except Exception as exc:
            self._fail(f"could not form the weight-sync group on port {port} ({_describe(exc)})")
        self._owns_group = True
        self.push_weights(model, version)

    # --- the Engine surface ----------------------------------------------------------------
    @property
    def version(self) -> int:
        """The policy version the child holds (set by the last acknowledged push)."""
        return self._version

    @property
    def closed(self) -> bool:
        """True once the child has been ended."""
        return self._closed

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[VersionedCompletion]:
        """Complete every prompt in the child; results in prompt order, tagged with the version."""
        plist = params if isinstance(params, list) else [params]
        if any(p is not None and p.on_token is not None for p in plist):
            raise ValueError(
                "SamplingParams.on_token (streaming) is not supported by the process engine"
            )
        with self._lock:  # one request in flight: replies carry no request id
            self._send(("generate", [list(p) for p in prompts], params), "generate")
            outs, version = self._receive("generate")
        if version != self._version:
            self._fail(f"holds policy version {version} but the trainer pushed {self._version}")
        return outs

    def push_weights(self, model: torch.nn.Module, version: int) -> int:
        """Broadcast `model`'s weights to the child as policy `version`; returns bytes sent."""
        meta = _state_meta(model)
        if meta != self._meta:
            diff = next(
                (a[0] for a, b in zip(meta, self._meta, strict=False) if a != b), "the tensor count"
            )
            raise EngineProcessError(
                f"push_weights: the model's state changed layout at {diff} "
                "since the engine started; restart the engine"
            )
        with self._lock:
            self._send(("load",), "a weight sync")
            try:
                self._dist.send(model, version)
            except Exception as exc:
                self._fail(f"broke off the weight broadcast ({_describe(exc)})")
            got, _ = self._receive("a weight sync")
        if got != version:
            self._fail(f"loaded policy version {got}, expected {version}")
        self._version = version
        return self._dist.last_bytes

    # --- plumbing --------------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...], what: str) -> None:
        if self._closed:
            raise EngineProcessError(f"the rollout engine process is closed (asked for {what})")
        try:
            self._conn.send(msg)
        except OSError:
            self._fail(f"is gone (asked for {what})", died=True)

    def _receive(self, what: str) -> Any:
        """The child's reply payload; a death, a timeout or an error raises EngineProcessError."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    msg = self._conn.recv()
                    break
            except (EOFError, OSError):
                self._fail(f"died during {what}", died=True)
            if not self._process.is_alive() and not self._conn.poll(0):
                self._fail(f"died during {what}", died=True)
            if time.monotonic() > deadline:
                self._fail(
                    f"did not answer {what} within {self.timeout_s:g} s "
                    "(plugins.rl.engine_timeout_s) and was killed"
                )
        if msg[0] == "error":
            if len(msg) > 2 and msg[2] == "ValueError" and what == "generate":
                raise ValueError(f"rollout engine: {msg[1]}")  # a bad request, as in-process
            self._fail(f"failed during {what}: {msg[1]}", graceful=True)
        return msg[1:]

    def _fail(self, reason: str, graceful: bool = False, died: bool = False) -> None:
        """End the child and raise the one-line error (how it ended, if it had ended itself)."""
        if died:  # its Pipe closes a moment before its exit status can be read
            self._process.join(_CLOSE_GRACE_S)
        code = self._process.exitcode
        self._shutdown(graceful=graceful)
        how = (
            ""
            if code is None or code == 0
            else (f" (killed by signal {-code})" if code < 0 else f" (exit code {code})")
        )
        hint = "; its own output above says more" if code is not None and code > 0 else ""
        raise EngineProcessError(f"the rollout engine process (pid {self.pid}){how} {reason}{hint}")

    def _shutdown(self, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        proc = self._process
        if graceful and proc.is_alive():
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            proc.join(_CLOSE_GRACE_S)
        if proc.is_alive():
            proc.kill()
        proc.join(_CLOSE_GRACE_S)
        self._conn.close()
        if self._owns_group:
            import torch.distributed as dist

            self._owns_group = False
            if dist.is_initialized():
                dist.destroy_process_group()

    def close(self) -> None:
        """Ask the child to exit (kill it if it does not), then leave the process group."""
        self._shutdown(graceful=True)

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProcessSync:
    """Weight sync to a `RemoteEngine`: the bucketed gloo broadcast (InProcessSync's surface)."""

    def __init__(self, engine: RemoteEngine):
        self.engine = engine
        self.last_seconds = 0.0
        self.last_bytes = 0

    def push(self, model: torch.nn.Module, version: int) -> None:
        """Broadcast `model`'s current weights to the engine process as policy `version`."""
        t0 = time.perf_counter()
        nbytes = self.engine.push_weights(model, version)
        self.last_seconds, self.last_bytes = time.perf_counter() - t0, nbytes
