"""The sandbox runner: results, isolation facts, degraded mode, concurrency, sandbox errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from k2_rl.sandbox import SandboxLimits, capabilities, protections, run_python

needs_full = pytest.mark.skipif(
    not (capabilities().root and capabilities().unshare), reason="needs root and a working unshare"
)


def test_protections_active_on_this_machine():
    caps = capabilities()
    assert caps.root == (os.geteuid() == 0)
    full = {
        "net_namespace",
        "pid_namespace",
        "mount_namespace",
        "readonly_fs",
        "unprivileged_user",
        "rlimit_nproc",
        "uid_sweep",
    }
    base = {
        "empty_env",
        "isolated_python",
        "rlimit_cpu",
        "rlimit_as",
        "rlimit_fsize",
        "rlimit_nofile",
        "wall_timeout",
        "output_cap",
        "temp_workdir",
        "process_group",
    }
    got = set(protections())
    assert base <= got
    if os.environ.get("K2_SANDBOX_EXPECT", "full") == "full":
        # the dev machine runs the tests as root with a working unshare: everything is on
        assert caps.root and caps.unshare and full <= got
    else:  # K2_SANDBOX_EXPECT=degraded on an unprivileged machine
        assert not caps.root and not full & got
    degraded = set(protections(SandboxLimits(isolation="rlimits")))
    assert base <= degraded and not {"net_namespace", "pid_namespace", "readonly_fs"} & degraded


def test_runs_with_stdin_files_and_reports():
    code = (
        "import os, sys\n"
        "data = sys.stdin.read()\n"
        "print(data.upper(), open('helper.txt').read(), sep='|')\n"
        "print(os.getcwd())\n"
        "print('err', file=sys.stderr)\n"
    )
    res = run_python(code, stdin="abc", files={"helper.txt": "from a file"})
    assert res.outcome == "ok" and res.ok and res.returncode == 0
    first, cwd = res.stdout.splitlines()
    assert first == "ABC|from a file" and res.stderr == "err\n"
    if "private_root" in res.protections:
        assert cwd == "/sandbox"  # a tmpfs made inside the mount namespace, gone with it
    else:
        assert Path(cwd).name.startswith("k2-sandbox-") and not Path(cwd).exists()  # removed
    assert res.wall_s > 0 and res.max_rss_mb > 0
    assert (res.uid is not None) == capabilities().root


@needs_full
def test_empty_environment_unprivileged_and_isolated_python(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.getcwd())  # -I ignores it
    code = (
        "import os, sys\n"
        "print(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
        "print(os.getuid(), os.getgid(), os.getgroups())\n"
        "print(any('site-packages' in p for p in sys.path))\n"
        "print(os.listdir('/root'), sys.base_prefix)\n"
        "import k2_rl\n"
    )
    res = run_python(code)
    env, ids, site, root, *_ = res.stdout.splitlines()
    assert env == "[]" and site == "False"
    # /root shows only the path down to the interpreter's prefix, when it lives there
    listed, prefix = root.rsplit(" ", 1)
    inside = Path(prefix).parts[2:3] if prefix.startswith("/root/") else ()
    assert listed == str(list(inside))
    uid, gid, groups = ids.split(" ", 2)
    assert int(uid) == res.uid and int(uid) != 0 and int(gid) != 0 and groups == "[]"
    assert res.outcome == "runtime_error" and "ModuleNotFoundError" in res.stderr


def test_nonzero_exit_and_exceptions_are_runtime_errors():
    assert run_python("raise SystemExit(3)").returncode == 3
    res = run_python("1 / 0")
    assert res.outcome == "runtime_error" and "ZeroDivisionError" in res.stderr


def test_degraded_rlimits_mode_still_limits():
    limits = SandboxLimits(isolation="rlimits", wall_s=1.0, cpu_s=1)
    ok = run_python("print(6 * 7)", limits=limits)
    assert ok.outcome == "ok" and ok.stdout == "42\n" and "pid_namespace" not in ok.protections
    slow = run_python("import time\ntime.sleep(30)", limits=limits)
    assert slow.outcome == "timeout"


def test_file_size_limit():
    res = run_python("open('big', 'wb').write(b'x' * (3 << 20))", limits=SandboxLimits(fsize_mb=1))
    assert res.outcome == "runtime_error" and "File too large" in res.stderr


def test_sandbox_errors_are_reported_not_raised(tmp_path):
    bad = run_python("print(1)", limits=SandboxLimits(python=str(tmp_path / "no-python")))
    assert bad.outcome == "sandbox_error" and "interpreter" in bad.error


@needs_full
def test_concurrent_runs_get_distinct_uids():
    results = []

    def one():
        results.append(run_python("import time, os\ntime.sleep(0.3)\nprint(os.getuid())"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.outcome == "ok" for r in results)
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 4 and uids == {r.uid for r in results}


@needs_full
@pytest.mark.parametrize("n", [1, 3])
def test_nproc_limit_counts_the_sandbox_user(n):
    code = (
        f"import os\npids = []\nfor _ in range({n + 2}):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        import time; time.sleep(1); os._exit(0)\n"
        "    pids.append(pid)\n"
    )
    res = run_python(code, limits=SandboxLimits(nproc=n))
    assert res.outcome == "runtime_error" and "BlockingIOError" in res.stderr


def _unprivileged_python() -> list[str] | None:
    """A command that runs /usr/bin/python3 as nobody with this project's packages importable."""
    setpriv, system = shutil.which("setpriv"), Path("/usr/bin/python3")
    if os.geteuid() != 0 or not setpriv or not system.exists():
        return None
    ver = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if ver != str(sys.version_info[:2]):
        return None  # the venv's compiled packages would not load
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(system)]


@pytest.mark.skipif(
    _unprivileged_python() is None,
    reason="needs root, setpriv and a /usr/bin/python3 of this Python's version",
)
def test_unprivileged_process_degrades_gracefully():
    import k2_core
    import k2_rl
    import pydantic

    paths = [str(Path(m.__file__).parents[1]) for m in (pydantic, k2_rl, k2_core)]
    script = (
        "import json\n"
        "from k2_rl.sandbox import SandboxLimits, protections, run_python\n"
        "lim = SandboxLimits(wall_s=2.0, cpu_s=1)\n"
        "runs = [run_python(c, limits=lim) for c in ('import os; print(os.getuid())',\n"
        "        'import time; time.sleep(30)', 'import os; os.kill(os.getppid(), 9)')]\n"
        "print(json.dumps([protections(), [[r.outcome, r.stdout, r.uid] for r in runs]]))\n"
    )
    out = subprocess.run(
        [*_unprivileged_python(), "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": ":".join(paths)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    prot, runs = json.loads(out.stdout)
    assert "rlimit_cpu" in prot and "wall_timeout" in prot
    assert not {"pid_namespace", "unprivileged_user", "rlimit_nproc"} & set(prot)
    assert runs == [["ok", "65534\n", None], ["timeout", "", None], ["runtime_error", "", None]]


def test_rl_refuses_a_code_reward_without_namespaces_unless_allowed():
    from k2_core.errors import ConfigError
    from k2_rl.options import RlOptions
    from k2_rl.rewards.code_reward import CodeReward
    from k2_rl.rewards.isolation import sandbox_protections
    from k2_rl.rewards.math_reward import MathReward
    from k2_rl.rewards.options import CodeRewardOptions

    weak = {
        "math": MathReward(),
        "code": CodeReward(CodeRewardOptions(sandbox={"isolation": "rlimits"})),
    }
    assert RlOptions(init="x").allow_weak_isolation is False
    with pytest.raises(
        ConfigError,
        match=r"tasks\.code\.reward_options\.sandbox\.isolation.*"
        r"allow_weak_isolation=true",
    ):
        sandbox_protections(weak, allow_weak_isolation=False)
    logged = sandbox_protections(weak, allow_weak_isolation=True)
    assert logged.startswith("code: ") and "net_namespace" not in logged
    assert sandbox_protections({"math": MathReward()}, allow_weak_isolation=False) == ""
    if capabilities().root and capabilities().unshare:
        strong = sandbox_protections({"code": CodeReward()}, allow_weak_isolation=False)
        assert "private_root" in strong and "net_namespace" in strong


def test_protections_are_logged_as_a_run_param():
    from types import SimpleNamespace

    from k2_rl.rewards.isolation import log_protections

    calls = []
    client = SimpleNamespace(log_param=lambda *a: calls.append(a))
    hooks = SimpleNamespace(tracker=SimpleNamespace(client=client, run_id="r1"))
    run = SimpleNamespace(plugins=SimpleNamespace(pm=SimpleNamespace(get_plugin=lambda n: hooks)))
    log_protections(run, "code: a,b")
    assert calls == [("r1", "sandbox.protections", "code: a,b")]
    no_tracker = SimpleNamespace(
        plugins=SimpleNamespace(pm=SimpleNamespace(get_plugin=lambda n: None))
    )
    log_protections(no_tracker, "code: a,b")  # no tracker: nothing to do, no error
    assert len(calls) == 1


@pytest.mark.slow
@needs_full
def test_k2_rl_logs_sandbox_protections_and_refuses_rlimits(tmp_path):
    from k2_core.configio import load_config
    from k2_core.errors import ConfigError
    from k2_rl.commands import config_path
    from k2_rl.rl_stage import RLTrainer
    from mlflow.tracking import MlflowClient
    from rl_fixtures import save_tiny_checkpoint

    init, _ = save_tiny_checkpoint(tmp_path / "init")

    def cfg(run_dir, *extra):
        return load_config(
            config_path("rl-code"),
            [
                f"plugins.rl.init={init}",
                f"checkpoint.dir={run_dir}",
                "train.steps=1",
                "checkpoint.every=1",
                "plugins.rl.k=2",
                "plugins.rl.prompts_per_iter=2",
                "plugins.rl.eval_prompts=0",
                "tracking.options.system_metrics=false",
                "data.options.builtin_n=20",
                "data.seq_len=128",
                *extra,
            ],
        )

    weak = (
        "plugins.rl.tasks=[{name: code, source: code, reward: code, budget: 10, "
        "reward_options: {sandbox: {isolation: rlimits}}}]"
    )
    with pytest.raises(ConfigError, match="allow_weak_isolation"):
        RLTrainer(cfg(tmp_path / "weak", weak, "tracking.tracker=null"))
    allowed = RLTrainer(
        cfg(
            tmp_path / "allowed",
            weak,
            "tracking.tracker=null",
            "plugins.rl.allow_weak_isolation=true",
        )
    )
    assert "net_namespace" not in allowed.sandbox_protections
    allowed.close()

    trainer = RLTrainer(
        cfg(
            tmp_path / "rl",
            "plugins.rl.tasks=[{name: code, source: code, reward: code, budget: 10}]",
        )
    )
    trainer.train()
    client = MlflowClient(f"sqlite:///{tmp_path / 'rl' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = run.data.params["sandbox.protections"]
    assert logged.startswith("code: ") and "private_root" in logged and "net_namespace" in logged
