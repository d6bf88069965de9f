"""Model-written code attacks the sandbox: each attack is contained, classified, and leaves nothing.

Every test also checks (autouse fixture) that no child of the test process survives and that no
process of the sandbox uid remains.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import psutil
import pytest
from k2_rl.sandbox import SandboxLimits, capabilities, run_python

# the attacks need the full isolation (root + unshare); this dev machine has it, and
# test_protections_active_on_this_machine in test_sandbox.py asserts that it does
pytestmark = pytest.mark.skipif(
    not (capabilities().root and capabilities().unshare),
    reason="needs root and a working unshare (network, pid and mount namespaces)",
)


def _limits(**kw) -> SandboxLimits:
    # a uid pool of this file's own, so no other test's sandbox shares its uids
    return SandboxLimits(uid_base=64000, uid_slots=4, **kw)


FAST = _limits(wall_s=3.0, cpu_s=2)
_uids: list[int] = []


def _run(code: str, limits: SandboxLimits = FAST, **kw):
    res = run_python(code, limits=limits, **kw)
    if res.uid is not None:
        _uids.append(res.uid)
    return res


@pytest.fixture(autouse=True)
def no_leftovers():
    """After each attack: no child process of ours and no process of a sandbox uid."""
    _uids.clear()
    yield
    me = psutil.Process()
    assert [p.pid for p in me.children(recursive=True)] == []
    deadline = time.monotonic() + 3  # killed orphans outside a pid namespace: init reaps them
    while (left := _uid_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def _uid_processes() -> list[dict]:
    return [
        p.info
        for p in psutil.process_iter(["pid", "uids", "name", "status"])
        if p.info["uids"] and p.info["uids"].real in _uids
    ]


def test_this_machine_isolates_fully():
    caps = capabilities()
    assert caps.root and caps.unshare, "the attack tests expect root and a working unshare here"
    res = _run("print('hi')")
    assert res.outcome == "ok" and res.uid is not None
    for p in (
        "net_namespace",
        "pid_namespace",
        "readonly_fs",
        "unprivileged_user",
        "empty_env",
        "private_root",
        "private_tmp",
        "disk_cap",
    ):
        assert p in res.protections


def test_socket_to_host_listener_never_connects():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        res = _run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('CONNECTED')"
        )
        srv.settimeout(0.3)
        with pytest.raises(TimeoutError):
            srv.accept()  # nothing ever arrived
    assert res.outcome == "runtime_error"
    assert "CONNECTED" not in res.stdout and "OSError" in res.stderr


def test_secret_in_parent_environment_is_unreadable(monkeypatch):
    secret = f"k2-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("K2_TEST_SECRET", secret)
    code = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(p, 'denied', e.errno)\n"
    )
    res = _run(code)
    assert res.outcome == "ok"
    assert secret not in res.stdout and "K2_TEST_SECRET" not in res.stdout
    assert "LC_CTYPE" in res.stdout or "{}" in res.stdout  # it did print its environment


def test_writes_outside_its_folder_change_nothing(tmp_path: Path):
    target = tmp_path / "target.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o777)  # only the sandbox, not file permissions, may stop the write
    os.chmod(target, 0o666)
    escape = Path("/tmp") / f"k2-sandbox-escape-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        "errors = []\n"
        f"for path in ({str(target)!r}, {str(escape)!r}, '/dev/shm/k2-escape'):\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('owned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        errors.append(e.strerror)\n"
        "print(errors)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "raise SystemExit(1 if errors else 0)\n"
    )
    try:
        res = _run(code)
        assert target.read_text() == "original"
        assert not escape.exists() and not Path("/dev/shm/k2-escape").exists()
        # the host's file does not exist in the new root; /tmp and /dev/shm are private
        # tmpfs folders there, so those writes land in the run's own capped scratch space
        assert f"WROTE {target}" not in res.stdout and "No such file or directory" in res.stdout
        assert res.outcome == "runtime_error"
    finally:
        escape.unlink(missing_ok=True)


def test_fork_bomb_is_contained():
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    t0 = time.monotonic()
    res = _run(code, _limits(wall_s=2.0, cpu_s=2, nproc=16))
    assert res.outcome == "timeout"
    assert time.monotonic() - t0 < 20


def test_allocating_8_gib_fails_as_memory():
    limits = _limits(wall_s=10.0, cpu_s=5, memory_mb=256)
    res = _run("data = bytearray(8 << 30)\nprint(len(data))", limits)
    assert res.outcome == "memory_limit" and "MemoryError" in res.stderr
    chunks = _run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n", limits)
    assert chunks.outcome == "memory_limit"


def test_infinite_loops_time_out():
    cpu = _run("while True:\n    pass\n", _limits(wall_s=20.0, cpu_s=1))
    assert cpu.outcome == "timeout" and "CPU time" in cpu.error  # RLIMIT_CPU ended it
    sleeper = _run("import time\ntime.sleep(60)\n", _limits(wall_s=1.0, cpu_s=1))
    assert sleeper.outcome == "timeout" and "wall clock" in sleeper.error
    assert sleeper.wall_s < 20  # far less than the 60 s it asked for


def test_printing_100_mb_is_capped():
    limits = _limits(wall_s=5.0, output_bytes=1 << 16)
    res = _run("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\n", limits)
    assert res.outcome == "output_limit" and res.stdout_truncated
    assert len(res.stdout) == 1 << 16
    loop = _run("while True:\n    print('y' * 1000)\n", limits)
    assert loop.outcome == "output_limit" and len(loop.stdout) == 1 << 16


def test_signalling_its_parent_fails_and_we_survive():
    me = os.getpid()
    code = (
        "import os, signal\n"
        "for target in (os.getppid(), 1, " + str(me) + "):\n"
        "    for sig in (signal.SIGTERM, signal.SIGKILL):\n"
        "        try:\n"
        "            os.kill(target, sig)\n"
        "            print('SENT', target, sig)\n"
        "        except OSError as e:\n"
        "            print('refused', target, type(e).__name__)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError as e:\n"
        "    print('kill -1', type(e).__name__)\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
    )
    res = _run(code)
    assert psutil.pid_exists(me) and psutil.Process(me).status() != psutil.STATUS_ZOMBIE
    assert "SENT" not in res.stdout
    assert res.outcome == "runtime_error" and "PermissionError" in res.stderr
    again = _run("print('still works')")
    assert again.outcome == "ok" and again.stdout == "still works\n"


def test_daemon_child_is_killed():
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.close(1); os.close(2)\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent done')\n"
    )
    t0 = time.monotonic()
    res = _run(code)
    assert res.outcome == "ok" and res.stdout == "parent done\n"
    assert time.monotonic() - t0 < 20  # returned without waiting out the daemon's 120 s
    assert res.leftovers_killed == 0  # the pid namespace already took it down


def test_daemon_child_is_killed_without_namespaces():
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent done')\n"
    )
    res = _run(code, _limits(isolation="rlimits", wall_s=5.0))
    assert res.outcome == "ok" and "pid_namespace" not in res.protections
    assert res.leftovers_killed == 1  # the uid sweep found the daemon and killed it


def test_host_unix_sockets_are_unreachable():
    # a 0777 socket under the host's /tmp and /dev/shm: Unix sockets ignore read-only mounts,
    # so only a root without the host's folders keeps them out
    paths = [
        Path("/tmp") / f"k2-sock-{uuid.uuid4().hex[:8]}",
        Path("/dev/shm") / f"k2-sock-{uuid.uuid4().hex[:8]}",
    ]
    servers = []
    try:
        for p in paths:
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(str(p))
            os.chmod(p, 0o777)
            srv.listen(8)
            srv.settimeout(0.3)
            servers.append(srv)
        code = (
            "import socket\n"
            f"for p in {[str(p) for p in paths]!r}:\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    try:\n"
            "        s.connect(p)\n"
            "        print('CONNECTED', p)\n"
            "    except OSError as e:\n"
            "        print('refused', type(e).__name__)\n"
        )
        res = _run(code)
        assert res.outcome == "ok" and "CONNECTED" not in res.stdout, res
        assert res.stdout.count("refused") == 2
        for srv in servers:
            with pytest.raises(TimeoutError):
                srv.accept()  # nothing ever arrived
    finally:
        for srv in servers:
            srv.close()
        for p in paths:
            p.unlink(missing_ok=True)


def test_host_files_are_invisible():
    secret = f"k2-secret-{uuid.uuid4().hex}"
    planted = [Path("/tmp") / f"{secret}.txt", Path("/dev/shm") / f"{secret}.txt"]
    for p in planted:
        p.write_text(secret)
        os.chmod(p, 0o644)  # world-readable: only the mount layout may keep it out
    here = str(Path.cwd())
    code = (
        "import os\n"
        f"for p in {[str(p) for p in planted] + ['/etc/passwd', '/etc/hostname', here]!r}:\n"
        "    try:\n"
        "        print('READ', open(p).read()[:40] if os.path.isfile(p) else os.listdir(p))\n"
        "    except OSError as e:\n"
        "        print('absent', type(e).__name__)\n"
        "print(sorted(os.listdir('/')))\n"
        "print(os.listdir('/tmp'), os.listdir('/dev/shm'), os.listdir('/run'))\n"
    )
    try:
        res = _run(code)
    finally:
        for p in planted:
            p.unlink(missing_ok=True)
    assert res.outcome == "ok", res
    lines = res.stdout.splitlines()
    assert lines[:5] == ["absent FileNotFoundError"] * 5 and secret not in res.stdout
    top = set(eval(res.stdout.splitlines()[-2]))  # noqa: S307 - our own program's list
    assert top <= {
        "dev",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "run",
        "sandbox",
        "tmp",
        "usr",
        "var",
        "root",
        "opt",
        "home",
        ".scratch",
    }
    assert res.stdout.splitlines()[-1] == "[] [] []"  # private, empty /tmp, /dev/shm, /run


def test_work_folder_has_a_disk_cap():
    t0 = time.monotonic()
    before = set(os.listdir("/tmp"))
    code = (
        "for i in range(64):\n"
        "    with open('f%d' % i, 'wb') as f:\n"
        "        f.write(b'x' * (16 << 20))\n"
        "print('WROTE ALL')\n"
    )
    res = _run(code, _limits(wall_s=20.0, cpu_s=10, fsize_mb=16))
    assert res.outcome == "disk_limit" and "WROTE ALL" not in res.stdout, res
    assert "64 MiB" in res.error
    assert time.monotonic() - t0 < 15
    # /tmp inside shares the same cap, and none of it lands in the host's /tmp
    small = _limits(wall_s=20.0, cpu_s=10, workdir_mb=8)
    res = _run(
        "open('a', 'wb').write(b'x' * (5 << 20))\nopen('/tmp/b', 'wb').write(b'x' * (5 << 20))\n",
        small,
    )
    assert res.outcome == "disk_limit", res
    big_new = [
        n
        for n in set(os.listdir("/tmp")) - before
        if os.path.isfile(f"/tmp/{n}") and os.path.getsize(f"/tmp/{n}") >= 1 << 20
    ]
    assert big_new == []


def test_peak_memory_is_reported_when_killed():
    grab = "data = b'x' * (96 << 20)\n"
    slow = _run(grab + "import time\ntime.sleep(60)\n", _limits(wall_s=1.5, cpu_s=2))
    assert slow.outcome == "timeout" and slow.max_rss_mb >= 90, slow
    loud = _run(
        grab + "while True:\n    print('y' * 1000)\n", _limits(wall_s=5.0, output_bytes=1 << 16)
    )
    assert loud.outcome == "output_limit" and loud.max_rss_mb >= 90, loud


def test_interpreter_is_named_and_read_only():
    import sys

    want = os.path.realpath(sys.base_prefix)
    res = _run(
        "import sys\nprint(sys.base_prefix)\n"
        "try:\n"
        "    open(sys.base_prefix + '/k2-owned', 'w')\n"
        "except OSError as e:\n"
        "    print(e.strerror)\n"
    )
    base, err = res.stdout.splitlines()
    # this interpreter lives under /root (mode 0700): it runs because it is bound in
    assert base == want and err == "Read-only file system"
    assert not os.path.exists(os.path.join(want, "k2-owned"))


def test_work_folder_is_made_inside_the_namespace(monkeypatch):
    from k2_rl.sandbox import runner

    def refuse(*a, **k):
        raise AssertionError("a host working folder was made")

    monkeypatch.setattr(runner, "_write_workdir", refuse)
    res = _run(
        "import os\nopen('x', 'w').write('y')\nprint(os.getcwd(), os.listdir('.'))",
        files={"helper.txt": "h"},
    )
    cwd, names = res.stdout.split(" ", 1)
    assert res.outcome == "ok" and cwd == "/sandbox"
    assert sorted(eval(names)) == ["helper.txt", "main.py", "x"]  # noqa: S307 - our own list
