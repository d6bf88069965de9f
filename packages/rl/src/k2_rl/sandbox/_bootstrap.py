"""Runs inside the sandbox, first as root: isolates the filesystem, then starts the program.

Started by `k2_rl.sandbox.runner` as `python -I -S _bootstrap.py CONFIG_JSON` (inside fresh
namespaces when they are available). Standard library only: it runs outside the project's
environment. As pid 1 of the namespace it forks the program, reaps everything, and reports the
program's status as one JSON line on the status pipe; when it exits the kernel kills whatever
the program left behind.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1
# per-mount flags kept on remount (a container may lock them; dropping one fails with EPERM)
_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
          "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
_LIMITS = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS,
           "nproc": resource.RLIMIT_NPROC, "fsize": resource.RLIMIT_FSIZE,
           "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}


def _say(fd, **msg):
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _mount(libc, src, dst, flags):
    if libc.mount(src, dst, None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dst!r}: {os.strerror(err)}")


def _unescape(path):
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def readonly_except(workdir, hide):
    """Make every mount read-only in this mount namespace, except a bind mount of `workdir`;
    cover the folders in `hide` with an empty tmpfs."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    _mount(libc, None, b"/", MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    for path in hide:
        if os.path.isdir(path):
            flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, b"size=4k,mode=755") != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"hide {path!r}: {os.strerror(err)}")
    wd = workdir.encode()
    _mount(libc, wd, wd, MS_BIND)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = _unescape(fields[4])
        if point == workdir or any(point == h or point.startswith(h + "/") for h in hide):
            continue  # the working folder stays writable; hidden folders are already covered
        keep = sum(v for k, v in _FLAGS.items() if k in fields[5].split(","))
        # fails closed: a mount left writable could be reached by the program
        _mount(libc, None, point.encode(), MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def start_program(cfg, status_fd):
    """In the forked child: limits, an unprivileged user, the empty environment, exec."""
    try:
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(_LIMITS[name], (value, value))
        libc = ctypes.CDLL(None, use_errno=True)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if cfg["pdeathsig"]:
            libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
        os.chdir(cfg["workdir"])
        os.umask(0o077)
        os.execve(cfg["argv"][0], cfg["argv"], {})
    except BaseException as e:  # noqa: BLE001 - any failure here is the sandbox's, not the program's
        _say(status_fd, error=f"start: {type(e).__name__}: {e}")
        os._exit(127)


def main():
    """Isolate, run the program, reap every process, report the program's status."""
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program never sees the status pipe
    try:
        if cfg["readonly"]:
            readonly_except(cfg["workdir"], cfg["hide"])
    except OSError as e:
        _say(status_fd, error=f"isolate: {e}")
        return 3
    pid = os.fork()
    if pid == 0:
        start_program(cfg, status_fd)
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return 3
        if done == pid:
            break
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -sig
    _say(status_fd, returncode=code, signal=sig, cpu_s=usage.ru_utime + usage.ru_stime,
         max_rss_kb=usage.ru_maxrss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
