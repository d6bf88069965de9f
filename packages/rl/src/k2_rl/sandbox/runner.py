"""Run untrusted Python in its own process: namespaces, a new root, an unprivileged uid, rlimits.

With root and `unshare` (this machine): fresh network, pid, mount, ipc and uts namespaces; a new
root (a tmpfs) that holds only the interpreter's prefix and the library folders, read-only, a few
/dev nodes, a fresh /proc, and one size-capped tmpfs for the work folder, /tmp, /dev/shm and
/run; a dedicated uid from a locked pool (RLIMIT_NPROC counts per uid), the empty environment,
`python -I -S`. Without them the run degrades to rlimits, a process group and the timeout;
`SandboxResult.protections` says which protections were active.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .limits import SandboxLimits
from .result import SandboxResult

_BOOTSTRAP = str(Path(__file__).with_name("_bootstrap.py"))
_UNSHARE_FLAGS = (
    "--net",
    "--pid",
    "--ipc",
    "--uts",
    "--mount",
    "--fork",
    "--kill-child",
    "--mount-proc",
)
_MAIN = "main.py"
WORKDIR = "/sandbox"  # the work folder inside the new root
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_LIB_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32")
_KILL_GRACE_S = 1.0  # how long a killed run's supervisor gets to report the program's peak


@dataclass(frozen=True)
class Capabilities:
    """What this machine lets the sandbox use."""

    root: bool
    unshare: str | None  # path of a working `unshare`, None when namespaces are unavailable


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """Probe once per process whether we are root and `unshare` can make fresh namespaces."""
    root = os.geteuid() == 0
    path = shutil.which("unshare")
    if path and root:
        try:
            probe = subprocess.run(
                [path, *_UNSHARE_FLAGS, "true"],
                env={},
                timeout=10,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            path = path if probe.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            path = None
    else:
        path = None  # unprivileged unshare would need user namespaces: not relied on
    return Capabilities(root=root, unshare=path)


def protections(limits: SandboxLimits | None = None) -> tuple[str, ...]:
    """The protections a run with `limits` gets on this machine."""
    limits = limits or SandboxLimits()
    caps = capabilities()
    namespaces = caps.unshare is not None and limits.isolation != "rlimits"
    out = [
        "process_group",
        "wall_timeout",
        "output_cap",
        "empty_env",
        "isolated_python",
        "temp_workdir",
        "rlimit_cpu",
        "rlimit_as",
        "rlimit_fsize",
        "rlimit_nofile",
    ]
    if caps.root:
        out += ["unprivileged_user", "no_new_privs", "rlimit_nproc", "uid_sweep"]
    if namespaces:
        out += [
            "net_namespace",
            "pid_namespace",
            "mount_namespace",
            "ipc_namespace",
            "readonly_fs",
            "private_root",
            "private_tmp",
            "disk_cap",
        ]
    return tuple(sorted(out))


_FIRST_USE_SWEPT: set[int] = set()


@contextmanager
def _uid_slot(limits: SandboxLimits) -> Iterator[int | None]:
    """Hold one uid of the pool (a file lock, so other processes' sandboxes skip it too)."""
    if not capabilities().root:
        yield None
        return
    folder = Path(tempfile.gettempdir())
    start = os.getpid() % limits.uid_slots  # spread processes over the pool
    order = [limits.uid_base + (start + i) % limits.uid_slots for i in range(limits.uid_slots)]
    handle, uid = None, None
    for attempt in (fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_EX):
        for cand in order if attempt & fcntl.LOCK_NB else order[:1]:
            f = open(folder / f"k2-sandbox-uid-{cand}.lock", "a")  # noqa: SIM115 - held open
            try:
                fcntl.flock(f, attempt)
            except BlockingIOError:
                f.close()
                continue
            handle, uid = f, cand
            break
        if handle is not None:
            break
    try:
        if uid not in _FIRST_USE_SWEPT:  # a crashed earlier process may have left some behind
            _sweep_uid(uid)
            _FIRST_USE_SWEPT.add(uid)
        yield uid  # the caller sweeps the uid before the slot is released
    finally:
        handle.close()


def _uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes owned by `uid` (the owner of /proc/<pid> is the euid)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(entry))
    return found


def _sweep_uid(uid: int | None, grace_s: float = 3.0) -> int:
    """Kill every process left by the sandbox user `uid`; the number that had to be killed."""
    if uid is None:
        return 0
    killed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while (pids := _uid_processes(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return len(killed)


@dataclass(frozen=True)
class _Interpreter:
    """The program's interpreter and what of the host it needs inside the new root."""

    python: str  # its real path (no venv, no symlink): what the new root shows
    prefix: str  # its sys.base_prefix, bound read-only
    binds: tuple[str, ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()


_INTERPRETERS: dict[tuple, _Interpreter] = {}


def _interpreter(limits: SandboxLimits) -> _Interpreter | None:
    """The first candidate interpreter the sandbox user can run with its own standard library
    (probed once per process and limits; a failed probe is retried next time)."""
    key = (limits.python, limits.isolation)
    if key not in _INTERPRETERS:
        found = _probe_interpreter(limits)
        if found is None:
            return None
        _INTERPRETERS[key] = found
    return _INTERPRETERS[key]


def _inside(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _layout(python: str, prefix: str) -> _Interpreter:
    """What to bind for `python`: its prefix (and itself when outside it) and the library
    folders; the top-level library links (/lib -> usr/lib) are made again as links."""
    binds: list[str] = [prefix]
    symlinks: list[tuple[str, str]] = []
    if not _inside(python, binds):
        binds.append(python)
    for lib in _LIB_DIRS:
        if os.path.islink(lib):
            target = os.path.realpath(lib)
            if os.path.isdir(target):
                symlinks.append((lib, os.readlink(lib)))
                if not _inside(target, binds):
                    binds.append(target)
        elif os.path.isdir(lib) and not _inside(lib, binds):
            binds.append(lib)
    # a folder inside another is already there through the outer bind (prefix /usr, /usr/lib)
    binds = [b for b in binds if not any(b != o and _inside(b, [o]) for o in binds)]
    return _Interpreter(python, prefix, tuple(sorted(binds)), tuple(symlinks))


def _probe_interpreter(limits: SandboxLimits) -> _Interpreter | None:
    explicit = limits.python
    cands = [explicit] if explicit else [os.path.realpath(sys.executable), "/usr/bin/python3"]
    probe = "import sys; print(sys.base_prefix)"
    for cand in cands:
        if not cand or not os.access(cand, os.X_OK):
            continue
        cand = os.path.realpath(cand)  # a venv's python is a link: run what it points to
        try:
            want = subprocess.run(
                [cand, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=10, env={}
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not want or not os.path.isdir(want):
            continue
        interp = _layout(cand, os.path.realpath(want))
        probe_limits = limits.model_copy(update={"python": cand, "wall_s": 30.0, "cpu_s": 10})
        got = _run(probe, None, probe_limits, {}, interp)
        if got.ok and got.stdout.strip() == want:
            return interp
    return None


def run_python(
    code: str,
    stdin: str | bytes | None = None,
    *,
    limits: SandboxLimits | None = None,
    files: Mapping[str, str | bytes] | None = None,
) -> SandboxResult:
    """Run `code` as main.py in a fresh sandbox (extra `files` beside it); never raises for it."""
    limits = limits or SandboxLimits()
    if limits.isolation == "namespaces" and capabilities().unshare is None:
        return SandboxResult(
            "sandbox_error",
            None,
            "",
            "",
            0.0,
            protections=protections(limits),
            error="isolation='namespaces' but unshare is unavailable "
            "(needs root and util-linux unshare)",
        )
    interp = _interpreter(limits)
    if interp is None:
        return SandboxResult(
            "sandbox_error",
            None,
            "",
            "",
            0.0,
            protections=protections(limits),
            error="no interpreter the sandbox user can run; set python=",
        )
    return _run(code, stdin, limits, files or {}, interp)


def _checked_files(code: str, files: Mapping[str, str | bytes]) -> dict[str, bytes]:
    """The program's files by relative path; a name that leaves the work folder is refused."""
    out = {}
    for name, content in {**files, _MAIN: code}.items():
        norm = os.path.normpath(name)
        if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
            raise ValueError(f"sandbox file {name!r} is outside the working folder")
        out[norm] = content if isinstance(content, bytes) else content.encode()
    return out


def _write_workdir(limits: SandboxLimits, files: dict[str, bytes], uid: int | None) -> str:
    """The host working folder of a run without namespaces (rlimits mode only)."""
    root = limits.workdir_root or tempfile.gettempdir()
    workdir = tempfile.mkdtemp(prefix="k2-sandbox-", dir=root)
    for name, content in files.items():
        path = Path(workdir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    if uid is not None:
        for dirpath, _, names in os.walk(workdir):
            os.chown(dirpath, uid, uid)
            for n in names:
                os.chown(os.path.join(dirpath, n), uid, uid)
    return workdir


_ROOT_MNT: list[str] = []


def _root_mount_point() -> str:
    """An empty folder, made once per process, that each run's private new root is mounted on
    (inside the run's own mount namespace: on the host it stays empty)."""
    if not _ROOT_MNT:
        path = tempfile.mkdtemp(prefix="k2-sandbox-mnt-")
        atexit.register(_remove_mount_point, path)
        _ROOT_MNT.append(path)
    return _ROOT_MNT[0]


def _remove_mount_point(path: str) -> None:
    """Remove the (empty) mount point at exit; a missing one is no error at shutdown."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def _run(
    code: str,
    stdin: str | bytes | None,
    limits: SandboxLimits,
    files: Mapping[str, str | bytes],
    interp: _Interpreter,
) -> SandboxResult:
    caps = capabilities()
    namespaces = caps.unshare is not None and limits.isolation != "rlimits"
    prot = protections(limits)
    start = time.monotonic()
    try:
        checked = _checked_files(code, files)
    except ValueError as e:
        return SandboxResult("sandbox_error", None, "", "", 0.0, protections=prot, error=str(e))
    with _uid_slot(limits) as uid:
        workdir = None
        if not namespaces:
            try:
                workdir = _write_workdir(limits, checked, uid)
            except OSError as e:
                return SandboxResult(
                    "sandbox_error",
                    None,
                    "",
                    "",
                    time.monotonic() - start,
                    protections=prot,
                    uid=uid,
                    error=f"cannot write the working folder: {e}",
                )
        try:
            res = _launch(limits, interp, workdir, checked, uid, stdin)
        finally:
            leftovers = _sweep_uid(uid)
            if workdir is not None:
                _remove(workdir)
    return SandboxResult(
        **res,
        wall_s=time.monotonic() - start,
        protections=prot,
        uid=uid,
        leftovers_killed=leftovers,
    )


def _remove(workdir: str) -> None:
    """Delete the working folder, even where the program took away its own permissions."""
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir):  # unprivileged mode: give back the permissions, then retry
        os.chmod(workdir, 0o700)
        for dirpath, dirnames, _ in os.walk(workdir):
            for d in dirnames:  # before os.walk lists them; never through a symlink
                if not os.path.islink(path := os.path.join(dirpath, d)):
                    os.chmod(path, 0o700)
        shutil.rmtree(workdir, ignore_errors=True)


def _rlimits(limits: SandboxLimits, uid: int | None) -> dict[str, int]:
    mib = 1 << 20
    out = {
        "cpu": limits.cpu_s,
        "as": limits.memory_mb * mib,
        "fsize": limits.fsize_mb * mib,
        "nofile": limits.nofile,
        "core": 0,
    }
    if uid is not None:  # per-uid count: only meaningful for a uid of our own
        out["nproc"] = limits.nproc
    return out


def _launch(
    limits: SandboxLimits,
    interp: _Interpreter,
    workdir: str | None,
    files: dict[str, bytes],
    uid: int | None,
    stdin: str | bytes | None,
) -> dict:
    namespaces = workdir is None
    status_r, status_w = os.pipe()
    ctrl_r, ctrl_w = os.pipe()  # a byte here asks the supervisor to kill the program
    # the program's files travel to the bootstrap through this (namespaces only)
    files_file = tempfile.TemporaryFile() if namespaces else None  # noqa: SIM115 - closed below
    cfg = {
        "status_fd": status_w,
        "ctrl_fd": ctrl_r,
        "new_root": namespaces,
        "workdir": WORKDIR if namespaces else os.path.realpath(workdir),
        "rlimits": _rlimits(limits, uid),
        "uid": uid,
        "gid": uid,
        "pdeathsig": True,
        "argv": [interp.python, "-I", "-S", "-B", "-X", "utf8", _MAIN],
    }
    pass_fds = [status_w, ctrl_r]
    if files_file is not None:
        # a line of [name, size] pairs, then the bytes: no encoding to undo on the other side
        files_file.write(json.dumps([[k, len(v)] for k, v in files.items()]).encode() + b"\n")
        for content in files.values():
            files_file.write(content)
        files_file.seek(0)
        cfg.update(
            files_fd=files_file.fileno(),
            root_mnt=_root_mount_point(),
            binds=list(interp.binds),
            symlinks=[list(x) for x in interp.symlinks],
            devices=[d for d in _DEVICES if os.path.exists(d)],
            disk_mb=limits.workdir_mb,
        )
        pass_fds.append(files_file.fileno())
    cmd = [sys.executable, "-I", "-S", _BOOTSTRAP, json.dumps(cfg)]
    if namespaces:
        cmd = [capabilities().unshare, *_UNSHARE_FLAGS, *cmd]
    stdin_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    if stdin is not None:
        stdin_file.write(stdin.encode() if isinstance(stdin, str) else stdin)
        stdin_file.seek(0)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            env={},
            start_new_session=True,
        )
    except OSError as e:
        os.close(status_r)
        os.close(ctrl_w)
        return {
            "outcome": "sandbox_error",
            "returncode": None,
            "stdout": "",
            "stderr": "",
            "error": f"cannot start the sandbox: {e}",
        }
    finally:
        os.close(status_w)
        os.close(ctrl_r)
        stdin_file.close()
        if files_file is not None:
            files_file.close()
    try:
        bufs, truncated, killed_for = _collect(proc, status_r, ctrl_w, limits)
    finally:
        _kill_group(proc)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
        os.close(ctrl_w)
    return _classify(limits, bufs, truncated, killed_for, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(
    proc: subprocess.Popen, status_r: int, ctrl_w: int, limits: SandboxLimits
) -> tuple[dict[str, bytearray], dict[str, bool], str]:
    """Read stdout, stderr (each capped) and the status pipe until done, the deadline or the cap;
    a run killed at the deadline or the cap still waits briefly for its status (peak memory)."""
    cap = limits.output_bytes
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    sel = selectors.DefaultSelector()
    for name, fd in (
        ("stdout", proc.stdout.fileno()),
        ("stderr", proc.stderr.fileno()),
        ("status", status_r),
    ):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    deadline = time.monotonic() + limits.wall_s
    status_done_at = None
    killed_for = ""
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            killed_for = "timeout"
            break
        if status_done_at is not None and now - status_done_at > 0.5:
            break  # the supervisor is gone; something outside the namespaces holds the pipes
        for key, _ in sel.select(timeout=min(0.1, deadline - now)):
            name = key.data
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                if name == "status":
                    status_done_at = time.monotonic()
                continue
            if name == "status":
                bufs[name] += chunk
                continue
            room = cap - len(bufs[name])
            bufs[name] += chunk[:room]
            if len(chunk) > room:
                truncated[name] = True
                killed_for = "output"
        if killed_for:
            break
    if killed_for:
        _await_status(sel, ctrl_w, bufs)
    sel.close()
    return bufs, truncated, killed_for


def _await_status(sel: selectors.BaseSelector, ctrl_w: int, bufs: dict[str, bytearray]) -> None:
    """Ask the supervisor to kill the program, then read its status (more output is dropped)."""
    try:
        os.write(ctrl_w, b"k")
    except OSError:
        return  # the supervisor is gone already
    deadline = time.monotonic() + _KILL_GRACE_S
    while any(key.data == "status" for key in sel.get_map().values()):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for key, _ in sel.select(timeout=min(0.1, left)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
            elif key.data == "status":
                bufs["status"] += chunk


def _classify(
    limits: SandboxLimits,
    bufs: dict[str, bytearray],
    truncated: dict[str, bool],
    killed_for: str,
    sup_rc: int | None,
) -> dict:
    status: dict = {}
    for line in bufs["status"].decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            continue
    out = bufs["stdout"].decode(errors="replace")
    err = bufs["stderr"].decode(errors="replace")
    rc, sig = status.get("returncode"), status.get("signal", 0)
    res = {
        "returncode": rc,
        "stdout": out,
        "stderr": err,
        "signal": sig,
        "cpu_s": status.get("cpu_s", 0.0),
        "max_rss_mb": status.get("max_rss_kb", 0) / 1024,
        "stdout_truncated": truncated["stdout"],
        "stderr_truncated": truncated["stderr"],
    }
    if killed_for == "timeout":
        return {**res, "outcome": "timeout", "error": f"wall clock over {limits.wall_s} s"}
    if killed_for == "output":
        return {
            **res,
            "outcome": "output_limit",
            "error": f"output over {limits.output_bytes} bytes",
        }
    if "error" in status:
        return {**res, "outcome": "sandbox_error", "error": status["error"]}
    if rc is None:
        if sup_rc is not None and sup_rc < 0 and not capabilities().root:
            # unprivileged degraded mode: the program shares our uid and killed its supervisor
            return {**res, "outcome": "runtime_error", "error": "supervisor killed from inside"}
        return {
            **res,
            "outcome": "sandbox_error",
            "error": f"the sandbox supervisor ended without a status (rc {sup_rc})",
        }
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and res["cpu_s"] >= limits.cpu_s - 0.5):
        return {**res, "outcome": "timeout", "error": f"CPU time over {limits.cpu_s} s"}
    if rc == 0:
        return {**res, "outcome": "ok"}
    if status.get("disk_full") or "No space left on device" in err[-2000:]:
        return {
            **res,
            "outcome": "disk_limit",
            "error": f"work folder over {limits.workdir_mb} MiB",
        }
    if "MemoryError" in err[-2000:]:
        return {**res, "outcome": "memory_limit", "error": f"memory over {limits.memory_mb} MiB"}
    return {
        **res,
        "outcome": "runtime_error",
        "error": f"killed by signal {sig}" if sig else f"exit status {rc}",
    }
