"""Weight push from a sharded trainer to rollout engines (the checkpoint-engine pattern).

Each trainer rank sends only the rows it owns, as `k2_core.trainstate.rank_share` assigns them
under the backend's checkpoint `Sharding` (experts from their EP owner, replicated tensors
spread over the replicas): no rank gathers the whole model. Every engine holds the whole model
and listens on TCP (`WeightReceiver`); every trainer rank streams its share to every engine.

Protocol (one TCP connection per trainer rank and engine per push; every frame is an 8-byte
big-endian header length, the header as UTF-8 JSON, then `nbytes` raw payload bytes):
- `bucket` {push, version, full, sender, index, crc32, nbytes, tensors: [{name, shape, start,
  rows, dtype, offset, nbytes}]}: rows [start, start + rows) of each named tensor (global
  `shape`), packed back to back in at most `bucket_mb` MiB (a larger share is cut by rows);
  `crc32` is zlib's over the payload. The receiver reads the rows straight into a staging
  copy of its tensors (converting another dtype), checks the checksum, and only then records
  which rows of which tensor it now has.
- `end` {push, sender, buckets}: the sender's last frame; the receiver answers {ok, received}
  once every frame before it is staged.
Then the trainers' process group synchronises (an all-gather of bucket counts), and rank 0
commits on a fresh connection to each engine, in two phases:
- `prepare` {push, version, full, buckets: {sender: count}}: the engine checks its staging
  (every bucket's checksum, the version is current + 1 unless `full`, every bucket of every
  sender arrived, every row of every tensor covered) and answers {ok} or {ok: false, error,
  message}; `switch` {push} (all engines prepared) loads the staging copy into the engine in one
  step under the engine's lock, so a generation in flight finishes on its version and every
  completion carries the version that produced it; `abort` {push} drops the staging copy.
A refusal reaches every trainer rank as the same one-line `WeightPushError` subclass, and
every engine stays on its previous version. `status` {} answers {version, crc32: {name: crc}}.
Before streaming, each trainer rank sends `hello` to every engine, which answers {ok, version}
or the reason it refuses. Headers are JSON and payloads raw bytes (no pickle). A receiver given
a `token` (`k2 serve --push-port`: the server's API key) refuses every frame whose `token`
field differs (compared in constant time), answering why and closing the connection; the token
travels in clear, like an HTTP bearer key, so keep the push on a trusted network (127.0.0.1 by
default). Limit: an engine that fails its `switch` after another engine switched leaves the
two on different versions (each reports it).

The module lives in k2_core because both sides use it: trainers (`k2_rl`) send, engines
(`k2 serve` in k2_data, the engines of `k2 rl`) receive.
"""

from __future__ import annotations

import hmac
import json
import random
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import K2Error
from .trainstate import Held, OneProcess, Sharding, rank_share

_LEN = struct.Struct(">Q")
_MAX_HEADER = 64 << 20


class WeightPushError(K2Error):
    """A weight push an engine refused or could not complete; the engines keep their version."""

    kind = "rl"


class BucketChecksumError(WeightPushError):
    """A bucket whose bytes do not match the crc32 its sender computed."""


class MissingBucketError(WeightPushError):
    """A push committed before every bucket, or every row of every tensor, arrived."""


class VersionGapError(WeightPushError):
    """A push whose version is not the engine's current version + 1 (and not a full reload)."""


_ERRORS: dict[str, type[WeightPushError]] = {
    c.__name__: c
    for c in (WeightPushError, BucketChecksumError, MissingBucketError, VersionGapError)
}


# -- frames ---------------------------------------------------------------------------------


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock` (ConnectionError when the peer closes first)."""
    n, got = view.nbytes, 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly n bytes from `sock`."""
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def _drain(sock: socket.socket, n: int) -> None:
    """Read and drop n bytes (a payload nobody will use)."""
    while n > 0:
        n -= len(_recv_exact(sock, min(n, 1 << 20)))


def send_frame(sock: socket.socket, header: dict[str, Any], payload: Sequence[Any] = ()) -> None:
    """One frame: header length, JSON header, then each payload buffer in order."""
    raw = json.dumps(header).encode()
    sock.sendall(_LEN.pack(len(raw)) + raw)
    for part in payload:
        sock.sendall(part)


def recv_header(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's header (its payload still to read), or None at a clean end of stream."""
    first = sock.recv(_LEN.size, socket.MSG_WAITALL)
    if not first:
        return None
    if len(first) < _LEN.size:
        first += _recv_exact(sock, _LEN.size - len(first))
    (n,) = _LEN.unpack(first)
    if n > _MAX_HEADER:
        raise ConnectionError(f"a frame header of {n} bytes: not a weight-push peer")
    return json.loads(bytes(_recv_exact(sock, n)))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray] | None:
    """(header, payload) of the next frame, or None at a clean end of stream."""
    header = recv_header(sock)
    if header is None:
        return None
    size = int(header.get("nbytes", 0))
    return header, (_recv_exact(sock, size) if size else bytearray())


def _request(address: tuple[str, int], header: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Send one control frame on a fresh connection; the engine's JSON answer."""
    with socket.create_connection(address, timeout=timeout_s) as s:
        send_frame(s, header)
        got = recv_frame(s)
    if got is None:
        raise ConnectionError(f"engine {address[0]}:{address[1]} closed without answering")
    return got[0]


def engine_status(
    address: tuple[str, int], timeout_s: float = 60.0, token: str | None = None
) -> dict[str, Any]:
    """An engine's {version, crc32: {tensor name: crc32 of its bytes}}."""
    return _request(address, {"kind": "status", "token": token}, timeout_s)


def tensor_crc32(t: torch.Tensor) -> int:
    """zlib crc32 of a tensor's raw bytes (row-major)."""
    return zlib.crc32(_raw(t))


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, without a copy when it is contiguous on the CPU."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise WeightPushError(
            f"unknown dtype {name!r} in a bucket header; the trainer and "
            "engine run different torch versions?"
        )
    return dt


# -- the sender -----------------------------------------------------------------------------


class _NoOptimizer:
    """An optimizer without parameters: `rank_share` then gives the model rows only."""

    param_groups: list[Any] = []
    state: dict[Any, Any] = {}


def push_share(model: torch.nn.Module, sharding: Sharding | None = None) -> list[Held]:
    """The model rows this process sends in a push: its checkpoint share (collective)."""
    return [h for h in rank_share(model, _NoOptimizer(), sharding) if h.group == "model"]


def _pieces(held: list[Held], limit: int) -> Iterator[Held]:
    """`held`, a tensor of more than `limit` bytes cut into runs of whole rows."""
    for h in held:
        t = h.tensor
        if not h.shape or t.dim() == 0:
            yield h
            continue
        row = max(1, t[0].numel() * t.element_size()) if len(t) else 1
        step = max(1, limit // row)
        for a in range(0, len(t), step):
            yield Held(h.group, h.name, h.shape, h.start + a, t[a : a + step])


def buckets(held: list[Held], bucket_mb: float) -> Iterator[list[Held]]:
    """Consecutive pieces of `held` packed into buckets of at most `bucket_mb` MiB (a row
    bigger than that travels alone)."""
    limit = max(1, int(bucket_mb * 2**20))
    cur: list[Held] = []
    size = 0
    for p in _pieces(held, limit):
        n = p.tensor.numel() * p.tensor.element_size()
        if cur and size + n > limit:
            yield cur
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        yield cur


@dataclass
class Faults:
    """Test hooks on a sender: damage bucket `corrupt` (one byte flipped after its checksum)
    or never send bucket `drop` (it still counts as sent)."""

    corrupt: int | None = None
    drop: int | None = None


@dataclass
class PushStats:
    """What this trainer rank sent in its latest push (to each engine)."""

    version: int = -1
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    send_seconds: float = 0.0
    per_rank_bytes: list[int] = field(default_factory=list)


def _dist(sharding: Sharding) -> Any:
    """torch.distributed when this push spans several processes, else None."""
    if sharding.world_size <= 1:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _broadcast_json(dist: Any, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (JSON bytes over the default group)."""
    raw = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    n = torch.tensor([len(raw)], dtype=torch.long)
    dist.broadcast(n, 0)
    buf = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(int(n), dtype=torch.uint8)
    )
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.numpy()))


class WeightPusher:
    """A trainer rank's side of a push: `push(model, version, sharding=...)` on every rank of
    the trainer's process group (collective) sends this rank's share to every engine."""

    def __init__(
        self,
        engines: list[tuple[str, int]],
        *,
        bucket_mb: float = 64.0,
        timeout_s: float = 120.0,
        faults: Faults | None = None,
        token: str | None = None,
    ):
        if not engines:
            raise WeightPushError("no engine addresses to push to")
        self.engines = [(str(h), int(p)) for h, p in engines]
        self.token = token
        self.bucket_mb = float(bucket_mb)
        self.timeout_s = float(timeout_s)
        self.faults = faults
        self.last = PushStats()

    def push(
        self,
        model: torch.nn.Module,
        version: int,
        *,
        sharding: Sharding | None = None,
        full: bool = False,
    ) -> PushStats:
        """Send this rank's share of `model` as policy `version` and commit it on every
        engine (collective over the trainer's ranks); raises a WeightPushError on refusal."""
        sh = sharding or OneProcess()
        dist = _dist(sh)
        t0 = time.perf_counter()
        push_id = random.getrandbits(62) if sh.rank == 0 else 0
        if dist is not None:
            push_id = int(_broadcast_json(dist, push_id))
        held = push_share(model, sh)
        stats = PushStats(version=version, tensors=len(held))
        problem = ""
        try:
            problem = self._hello()
            if not problem:
                self._stream(held, push_id, version, full, sh.rank, stats)
        except (OSError, ConnectionError) as exc:  # reported by rank 0 below, on every rank
            problem = f"trainer rank {sh.rank} could not stream to the engines ({exc})"
        stats.send_seconds = time.perf_counter() - t0
        counts, sizes, problems = [stats.buckets], [stats.bytes], [problem]
        if dist is not None:
            counts = self._gather_ints(dist, stats.buckets, sh.world_size)
            sizes = self._gather_ints(dist, stats.bytes, sh.world_size)
            flags = self._gather_ints(dist, int(bool(problem)), sh.world_size)
            problems = [
                problem if r == sh.rank else ("failed" if f else "") for r, f in enumerate(flags)
            ]
        stats.per_rank_bytes = sizes
        outcome: dict[str, Any] = {}
        if sh.rank == 0:
            failed = [r for r, p in enumerate(problems) if p]
            if failed:
                outcome = {
                    "error": "WeightPushError",
                    "message": problem
                    or f"trainer rank {failed[0]} could not stream "
                    "its buckets to the engines (see its log); push again",
                }
                self._finish(push_id, "abort")
            else:
                outcome = self._commit(push_id, version, full, counts)
        if dist is not None:
            outcome = _broadcast_json(dist, outcome)
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        if outcome.get("error"):
            raise _ERRORS.get(outcome["error"], WeightPushError)(outcome["message"])
        return stats

    def _hello(self) -> str:
        """ "" when every engine accepts this sender, else the first refusal's message."""
        for addr in self.engines:
            answer = _request(addr, {"kind": "hello", "token": self.token}, self.timeout_s)
            if not answer.get("ok"):
                return f"engine {addr[0]}:{addr[1]}: {answer.get('message', 'refused the push')}"
        return ""

    @staticmethod
    def _gather_ints(dist: Any, value: int, size: int) -> list[int]:
        out = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.long))
        return [int(t) for t in out]

    def _stream(
        self, held: list[Held], push_id: int, version: int, full: bool, rank: int, stats: PushStats
    ) -> None:
        """Every bucket of `held` to every engine, then `end`; waits for their acks."""
        socks = [socket.create_connection(a, timeout=self.timeout_s) for a in self.engines]
        try:
            with ThreadPoolExecutor(len(socks)) as pool:
                for index, bucket in enumerate(buckets(held, self.bucket_mb)):
                    header, parts = self._encode(bucket, push_id, version, full, rank, index)
                    header["token"] = self.token
                    stats.buckets += 1
                    stats.bytes += header["nbytes"]
                    if self.faults is not None and self.faults.drop == index:
                        continue
                    if self.faults is not None and self.faults.corrupt == index:
                        first = bytearray(parts[0])
                        first[len(first) // 2] ^= 0xFF
                        parts = [first, *parts[1:]]
                    sends = [pool.submit(send_frame, s, header, parts) for s in socks]
                    for f in sends:
                        f.result()
                end = {
                    "kind": "end",
                    "push": push_id,
                    "sender": rank,
                    "buckets": stats.buckets,
                    "token": self.token,
                }
                for s in socks:
                    send_frame(s, end)
                for s, addr in zip(socks, self.engines, strict=True):
                    if recv_frame(s) is None:
                        raise ConnectionError(f"engine {addr[0]}:{addr[1]} closed the stream")
        finally:
            for s in socks:
                s.close()

    @staticmethod
    def _encode(
        bucket: list[Held], push_id: int, version: int, full: bool, rank: int, index: int
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """A bucket's header (with the crc32 of its bytes) and its payload buffers."""
        parts, tensors, crc, offset = [], [], 0, 0
        for p in bucket:
            raw = _raw(p.tensor)
            crc = zlib.crc32(raw, crc)
            tensors.append(
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "start": p.start,
                    "rows": p.rows,
                    "dtype": str(p.tensor.dtype).removeprefix("torch."),
                    "offset": offset,
                    "nbytes": raw.nbytes,
                }
            )
            parts.append(raw)
            offset += raw.nbytes
        header = {
            "kind": "bucket",
            "push": push_id,
            "version": version,
            "full": full,
            "sender": rank,
            "index": index,
            "crc32": crc,
            "nbytes": offset,
            "tensors": tensors,
        }
        return header, parts

    def _finish(self, push_id: int, kind: str) -> list[dict[str, Any]]:
        """Send `switch` or `abort` to every engine; their answers (errors as answers)."""
        out = []
        for addr in self.engines:
            try:
                out.append(
                    _request(
                        addr, {"kind": kind, "push": push_id, "token": self.token}, self.timeout_s
                    )
                )
            except OSError as exc:
                out.append(
                    {
                        "ok": False,
                        "error": "WeightPushError",
                        "message": f"engine {addr[0]}:{addr[1]}: {kind} failed ({exc})",
                    }
                )
        return out

    def _commit(self, push_id: int, version: int, full: bool, counts: list[int]) -> dict[str, Any]:
        """Two-phase commit on every engine (rank 0); {} or {error, message}."""
        prepare = {
            "kind": "prepare",
            "push": push_id,
            "version": version,
            "full": full,
            "buckets": {str(r): n for r, n in enumerate(counts)},
            "token": self.token,
        }
        answers = []
        for addr in self.engines:
            try:
                answers.append(_request(addr, prepare, self.timeout_s))
            except OSError as exc:
                answers.append(
                    {
                        "ok": False,
                        "error": "WeightPushError",
                        "message": f"engine {addr[0]}:{addr[1]} did not answer the "
                        f"commit of version {version} ({exc}); push again",
                    }
                )
        bad = [a for a in answers if not a.get("ok")]
        if bad:
            self._finish(push_id, "abort")
            return {"error": bad[0].get("error", "WeightPushError"), "message": bad[0]["message"]}
        bad = [a for a in self._finish(push_id, "switch") if not a.get("ok")]
        if bad:
            return {"error": "WeightPushError", "message": bad[0]["message"]}
        return {}


# -- the receiver ---------------------------------------------------------------------------


class _Staging:
    """One version being assembled: full tensors, rows covered, buckets seen, first error."""

    def __init__(self, push_id: int, version: int, own: dict[str, torch.Tensor]):
        self.push_id, self.version = push_id, version
        self.tensors = {n: torch.empty_like(t) for n, t in own.items()}
        self.covered: dict[str, list[tuple[int, int]]] = {n: [] for n in own}
        self.seen: dict[int, set[int]] = {}
        self.error: tuple[str, str] | None = None


def _rows(t: torch.Tensor) -> int:
    return int(t.shape[0]) if t.dim() else 1


def _gaps(runs: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """The row ranges of [0, total) that `runs` leave uncovered."""
    out, at = [], 0
    for a, b in sorted(runs):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < total:
        out.append((at, total))
    return out


class WeightReceiver:
    """An engine's side of a push: listens on `host:port` (0: any free port), assembles each
    pushed version in a staging copy and switches `engine` to it atomically on commit.

    `engine` needs `model`, `version` and `load_weights(state, version)` (taking the lock its
    `generate` holds), like `k2_data.inference.engine.Engine`."""

    def __init__(
        self,
        engine: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 120.0,
        token: str | None = None,
    ):
        self.engine = engine
        self.token = token
        self.timeout_s = float(timeout_s)
        self._own = {n: t.detach() for n, t in engine.model.state_dict().items()}
        self._lock = threading.Lock()  # the staging state
        self._serving = threading.Lock()  # a generation through `generate`, or a switch
        self._staging: _Staging | None = None
        self._ended: deque[int] = deque(maxlen=64)  # pushes switched or aborted: late frames
        self.last_error: str | None = None
        self.switches = 0
        self._server = socket.create_server((host, port))
        self._server.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="k2-weight-receiver", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the trainers connect to."""
        host, port = self._server.getsockname()[:2]
        return str(host), int(port)

    @property
    def version(self) -> int:
        """The policy version the engine serves now."""
        return int(self.engine.version)

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The engine's completions, each tagged (`.version`) with the version that produced
        it: a switch waits for the generation in flight."""
        with self._serving:
            version = self.version
            outs = self.engine.generate(*args, **kwargs)
        for c in outs:
            c.version = version
        return outs

    def close(self) -> None:
        """Stop listening (connections in progress end with their stream)."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- serving ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.timeout_s)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while (header := recv_header(conn)) is not None:
                    if not self._authentic(header):
                        send_frame(
                            conn,
                            {
                                "ok": False,
                                "error": "WeightPushError",
                                "message": "the engine refused the push: missing or wrong push "
                                "token (k2 serve: the server's API key)",
                            },
                        )
                        return
                    if header.get("kind") == "bucket":
                        self._bucket(conn, header)
                        continue
                    _drain(conn, int(header.get("nbytes", 0)))
                    send_frame(conn, self._handle(header))
            except Exception as exc:  # noqa: BLE001 - a bad peer ends its connection, not the engine
                self.last_error = f"a weight-push connection failed: {exc}"

    def _authentic(self, h: dict[str, Any]) -> bool:
        """Whether a frame carries this receiver's token (any frame when it has none)."""
        if self.token is None:
            return True
        return hmac.compare_digest(str(h.get("token") or "").encode(), self.token.encode())

    def _handle(self, h: dict[str, Any]) -> dict[str, Any]:
        kind = h.get("kind")
        if kind == "hello":
            return {"ok": True, "version": self.version}
        if kind == "end":
            with self._lock:
                st = self._staging
                n = len(st.seen.get(int(h["sender"]), ())) if st and st.push_id == h["push"] else 0
            return {"ok": True, "received": n}
        if kind == "prepare":
            return self._prepare(h)
        if kind == "switch":
            return self._switch(h)
        if kind == "abort":
            with self._lock:
                self._ended.append(h["push"])
                if self._staging is not None and self._staging.push_id == h["push"]:
                    self._staging = None
            return {"ok": True}
        if kind == "status":
            with self._serving:  # not halfway through a switch
                crcs = {n: tensor_crc32(t) for n, t in self._own.items()}
                return {"ok": True, "version": self.version, "crc32": crcs}
        return {"ok": False, "error": "WeightPushError", "message": f"unknown frame {kind!r}"}

    def _stage(self, h: dict[str, Any]) -> _Staging | None:
        """The staging copy of push `h["push"]` (a new push replaces an unfinished one; a
        late frame of a push already switched or aborted gets None)."""
        with self._lock:
            if h["push"] in self._ended:
                return None
            if self._staging is None or self._staging.push_id != h["push"]:
                self._staging = _Staging(h["push"], int(h["version"]), self._own)
            return self._staging

    def _invalid(self, h: dict[str, Any]) -> str | None:
        """Why bucket header `h` does not fit this engine's tensors, or None."""
        at = 0
        for t in h["tensors"]:
            own = self._own.get(t["name"])
            if own is None or list(own.shape) != list(t["shape"]):
                return (
                    f"{t['name']} is {t['shape']} on the trainer but "
                    f"{list(own.shape) if own is not None else 'absent'} on the engine; "
                    "start the engine from the trainer's model config"
                )
            start, rows = int(t["start"]), int(t["rows"])
            size = rows * (own.numel() // max(1, _rows(own))) * _dtype(t["dtype"]).itemsize
            if (
                start < 0
                or rows < 1
                or start + rows > _rows(own)
                or t["offset"] != at
                or t["nbytes"] != size
            ):
                return (
                    f"rows {start}..{start + rows} of {t['name']} do not fit the engine's "
                    "tensor; the trainer and engine disagree on the model"
                )
            at += size
        return None if at == int(h["nbytes"]) else "its size disagrees with its tensors"

    def _bucket(self, conn: socket.socket, h: dict[str, Any]) -> None:
        """Receive a bucket's payload straight into the staging rows, then check its crc32."""
        st = self._stage(h)
        sender, index = int(h["sender"]), int(h["index"])
        names = [t["name"] for t in h["tensors"]]
        where = (
            f"bucket {index} of trainer rank {sender} ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''})"
        )
        problem = None if st is None else self._invalid(h)
        if st is None or problem:
            _drain(conn, int(h["nbytes"]))
            if st is not None and problem:
                self._fail(st, "WeightPushError", f"{where}: {problem}")
            return
        crc, runs = 0, []
        for t in h["tensors"]:
            dtype, start, rows = _dtype(t["dtype"]), int(t["start"]), int(t["rows"])
            full = st.tensors[t["name"]]
            dst = full.view(_rows(full), -1)[start : start + rows]
            if dtype == dst.dtype:  # no copy: the socket writes into the staging tensor
                view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
                _recv_into(conn, view)
                crc = zlib.crc32(view, crc)
            else:  # another dtype on the trainer (BF16 there, FP32 here): convert
                buf = _recv_exact(conn, int(t["nbytes"]))
                crc = zlib.crc32(buf, crc)
                dst.copy_(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(rows, -1))
            runs.append((t["name"], start, start + rows))
        if crc != int(h["crc32"]):
            self._fail(
                st,
                "BucketChecksumError",
                f"{where} failed its crc32 check (corrupted in transit); the engine "
                f"stays on version {self.version}: push version {st.version} again",
            )
            return
        with self._lock:
            for name, a, b in runs:
                st.covered[name].append((a, b))
            st.seen.setdefault(sender, set()).add(index)

    def _fail(self, st: _Staging, error: str, message: str) -> None:
        with self._lock:
            if st.error is None:
                st.error = (error, message)

    def _prepare(self, h: dict[str, Any]) -> dict[str, Any]:
        version, full = int(h["version"]), bool(h.get("full"))
        with self._lock:
            st = self._staging if self._staging and self._staging.push_id == h["push"] else None
            refusal = self._check(st, version, full, h.get("buckets", {}))
        if refusal is not None:
            self.last_error = refusal[1]
            return {"ok": False, "error": refusal[0], "message": refusal[1]}
        return {"ok": True}

    def _check(
        self, st: _Staging | None, version: int, full: bool, expected: dict[str, int]
    ) -> tuple[str, str] | None:
        """Why the staged version cannot be switched to, or None."""
        current = self.version
        keep = f"the engine stays on version {current}"
        if st is not None and st.error is not None:
            return st.error
        if not full and version != current + 1:
            return (
                "VersionGapError",
                f"push of version {version} to an engine on version {current} (expected "
                f"{current + 1}); {keep}: push version {current + 1}, or a full reload",
            )
        if st is None or st.version != version:
            return (
                "MissingBucketError",
                f"no bucket of version {version} arrived; {keep}: push again",
            )
        for sender, n in sorted(expected.items(), key=lambda kv: int(kv[0])):
            missing = sorted(set(range(int(n))) - st.seen.get(int(sender), set()))
            if missing:
                gaps = []
                for name, runs in st.covered.items():
                    gaps += [(name, g) for g in _gaps(runs, _rows(self._own[name]))][:1]
                what = (
                    f" (rows {gaps[0][1][0]}..{gaps[0][1][1]} of {gaps[0][0]} not received)"
                    if gaps
                    else ""
                )
                return (
                    "MissingBucketError",
                    f"bucket {missing[0]} of trainer rank {sender} never arrived ({len(missing)}"
                    f" of {n} missing){what}; {keep}: push version {version} again",
                )
        for name, runs in st.covered.items():
            gap = _gaps(runs, _rows(self._own[name]))
            if gap:
                return (
                    "MissingBucketError",
                    f"rows {gap[0][0]}..{gap[0][1]} of {name} were in no bucket of version "
                    f"{version}; {keep}: push from every trainer rank",
                )
        return None

    def _switch(self, h: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            st = self._staging if self._staging and self._staging.push_id == h["push"] else None
            self._staging = None
            self._ended.append(h["push"])
        if st is None:
            return {
                "ok": False,
                "error": "WeightPushError",
                "message": f"switch without a prepared version; the engine stays on version "
                f"{self.version}: push again",
            }
        with self._serving:  # generations in flight finish on the version they started on
            self.engine.load_weights(st.tensors, st.version)
        self.switches += 1
        self.last_error = None
        return {"ok": True, "version": self.version}
