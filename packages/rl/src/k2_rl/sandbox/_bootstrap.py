"""Runs inside the sandbox, first as root: builds a new root, then starts the program.

Started by `k2_rl.sandbox.runner` as `python -I -S _bootstrap.py CONFIG_JSON` (inside fresh
namespaces when they are available). Standard library only: it runs outside the project's
environment. With namespaces it mounts a tmpfs as the new root, binds in read-only only what the
interpreter needs (its prefix, the library folders, /dev/null-like devices), adds a fresh /proc
and one size-capped tmpfs for the work folder, /tmp, /dev/shm and /run, and pivots into it:
nothing else of the host (its /tmp, its sockets, its files) exists for the program. As pid 1 of
the namespace it forks the program, reaps everything, and reports the program's status and
peak memory as one JSON line on the status pipe, also when the runner asks it to kill the
program (timeout, output cap); when it exits the kernel kills whatever the program left behind.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_RELATIME = 4096  # statvfs's bit for relatime differs from the mount flag
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}  # no glibc wrapper: raw syscall
_LIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _say(fd, **msg):
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _mount(src, dst, fstype, flags, data=None):
    def b(s):
        return s.encode() if isinstance(s, str) else s

    if _libc.mount(b(src), b(dst), b(fstype), flags, b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dst!r}: {os.strerror(err)}")


def _bind_readonly(src, dst, extra=MS_NOSUID):
    """Bind `src` at `dst` (not its submounts: they stay out) and make that mount read-only."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND)
    f = os.statvfs(dst).f_flag
    # flags the host mount has must be kept (a container locks them: dropping one is EPERM)
    keep = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    keep |= MS_RELATIME if f & ST_RELATIME else 0
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep | extra)


def new_root(cfg, files):
    """Build the program's whole filesystem in a private tmpfs and pivot into it."""
    root = cfg["root_mnt"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, target in cfg["symlinks"]:
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(target, root + path)
    for path in cfg["binds"]:  # the interpreter's prefix and the shared libraries
        _bind_readonly(path, root + path)
    for dev in cfg["devices"]:  # device nodes need a mount without nodev
        _bind_readonly(dev, root + dev, extra=MS_NOSUID | MS_NOEXEC)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # one tmpfs, capped, for every writable place; its own mount point is detached after the
    # pivot, and the mount lives on through its binds below
    scratch = root + "/.scratch"
    os.makedirs(scratch)
    _mount(
        "tmpfs",
        scratch,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={cfg['disk_mb']}m,mode=700,nr_inodes=16384",
    )
    uid = cfg["uid"]
    for name, where, mode in (
        ("work", cfg["workdir"], 0o700),
        ("tmp", "/tmp", 0o700),
        ("shm", "/dev/shm", 0o700),
        ("run", "/run", 0o755),
    ):
        os.makedirs(f"{scratch}/{name}", mode=mode)
        if uid is not None and name != "run":  # /run stays root's: empty and not writable
            os.chown(f"{scratch}/{name}", uid, uid)
        os.makedirs(root + where, exist_ok=True)
        _mount(f"{scratch}/{name}", root + where, None, MS_BIND)
    os.makedirs(root + "/var/run", exist_ok=True)  # empty, on the read-only skeleton
    _write_files(f"{scratch}/work", files, uid)
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    number = _PIVOT_ROOT.get(os.uname().machine)
    if number is not None and _libc.syscall(number, b".", b".") == 0:
        # the old root now sits on top of the new one: detach it, and with it every host path
        detach = (b".", b"/.scratch")
    else:
        # pivot_root is refused where / is the initial ramfs: chroot instead; the program, an
        # unprivileged user without CAP_SYS_CHROOT, cannot climb out of it
        os.chroot(".")
        detach = (b"/.scratch",)
    for old in detach:
        if _libc.umount2(old, MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {old.decode()}: {os.strerror(err)}")
    os.chdir("/")


def _read_files(fd):
    """The program's files from `fd`: a JSON line of [name, size] pairs, then the bytes."""
    with os.fdopen(fd, "rb") as f:
        sizes = json.loads(f.readline())
        return {name: f.read(size) for name, size in sizes}


def _write_files(workdir, files, uid):
    for name, content in files.items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    if uid is not None:
        for dirpath, dirnames, names in os.walk(workdir):
            for n in dirnames + names:
                os.chown(os.path.join(dirpath, n), uid, uid)


def start_program(cfg, status_fd):
    """In the forked child: limits, an unprivileged user, the empty environment, exec."""
    try:
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(_LIMITS[name], (value, value))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if cfg["pdeathsig"]:
            _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
        os.chdir(cfg["workdir"])
        os.umask(0o077)
        os.execve(cfg["argv"][0], cfg["argv"], {})
    except BaseException as e:  # noqa: BLE001 - any failure here is the sandbox's, not the program's
        _say(status_fd, error=f"start: {type(e).__name__}: {e}")
        os._exit(127)


def _wait_program(pid, ctrl_fd, whole_namespace):
    """Reap children until the program ends; a byte on the control pipe kills it first.

    No thread: SIGCHLD writes to a wakeup pipe, so one select watches both."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup pipe is written
    watch = [ctrl_fd, wake_r]
    while True:
        while True:  # reap every child that has ended (orphans of the program included)
            done, status, usage = os.wait4(-1, os.WNOHANG)
            if done == pid:
                return status, usage
            if done == 0:
                break
        ready, _, _ = select.select(watch, [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        if ctrl_fd in ready:
            if os.read(ctrl_fd, 1):
                # as pid 1 of the namespace, kill(-1) reaches every process in it but this one
                os.kill(-1 if whole_namespace else pid, signal.SIGKILL)
            watch.remove(ctrl_fd)  # asked once (or the runner closed it): wait for the end


def _disk_full(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def main():
    """Isolate, run the program, reap every process, report the program's status."""
    cfg = json.loads(sys.argv[1])
    status_fd, ctrl_fd = cfg["status_fd"], cfg["ctrl_fd"]
    os.set_inheritable(status_fd, False)  # the program never sees the status pipe
    os.set_inheritable(ctrl_fd, False)
    try:
        if cfg["new_root"]:
            new_root(cfg, _read_files(cfg["files_fd"]))
    except OSError as e:
        _say(status_fd, error=f"isolate: {e}")
        return 3
    pid = os.fork()
    if pid == 0:
        start_program(cfg, status_fd)
    try:
        status, usage = _wait_program(pid, ctrl_fd, cfg["new_root"])
    except ChildProcessError:
        return 3
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -sig
    _say(
        status_fd,
        returncode=code,
        signal=sig,
        cpu_s=usage.ru_utime + usage.ru_stime,
        max_rss_kb=usage.ru_maxrss,
        disk_full=cfg["new_root"] and _disk_full(cfg["workdir"]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
