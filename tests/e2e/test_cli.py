"""The `k2` script as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

K2 = str(Path(sys.executable).parent / "k2")


def k2(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([K2, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_core_commands():
    out = k2("--help")
    assert out.returncode == 0
    for cmd in ("plugins", "config", "params", "import-hf", "export-hf"):
        assert cmd in out.stdout


def test_params_k2_1t_exact():
    out = k2("params", "k2-1t", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["total"] == 1_026_408_209_408
    assert data["active"] == 32_861_477_888
    text = k2("params", "k2-1t").stdout
    assert "1,026,408,209,408 total" in text and "32,861,477,888 active" in text


def test_config_show_with_overrides():
    out = k2("config", "show", "tiny", "optim.lr=3e-3", "moe.n_routed_experts=32", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["optim"]["lr"] == 0.003 and data["moe"]["n_routed_experts"] == 32
    assert "lr: 0.003" in k2("config", "show", "tiny", "optim.lr=3e-3").stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["config", "show", "tiny", "optim.lr=-1"],
            "k2: config error: optim.lr: must be > 0 (got -1)",
        ),
        (
            ["config", "show", "tiny", "moe.num_experts_per_tok=20"],
            "k2: config error: moe.num_experts_per_tok: must be <= n_routed_experts (16), got 20",
        ),
        (["config", "show", "tiny", "model.no_such_field=3"], "model.no_such_field: unknown key"),
        (["config", "show", "nope-preset"], "no preset or file named 'nope-preset'"),
        (["config", "show", "/no/such/file.yaml"], "/no/such/file.yaml: no such file"),
        (["params", "tiny", "moe.router=zz"], "moe.router: no router named 'zz'"),
        (["config", "frobnicate"], "k2: usage error"),
    ],
)
def test_bad_input_exit_2_one_line(args, needle):
    out = k2(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_malformed_yaml_file(tmp_path):
    (tmp_path / "b.yaml").write_text("model: [unclosed\n")
    out = k2("config", "show", str(tmp_path / "b.yaml"))
    assert out.returncode == 2 and "malformed YAML" in out.stderr and "Traceback" not in out.stderr


def test_help_imports_no_torch_and_takes_under_a_cpu_second():
    """`k2 --help` builds every plugin's command line; none of them may pull in torch."""
    import resource

    probe = (
        "import sys, k2_core.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'fastapi', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "k2_core.cli", "--help"], capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, cpu


def test_command_has_its_own_module_and_the_old_forms_still_work():
    """`k2_core.command.Command(help, add_arguments, run)`; `k2_core.cli.Command` and a leading
    name (the old form) keep working for a release, with a DeprecationWarning."""
    import warnings

    import k2_core.cli
    from k2_core.command import Command

    def add(p):
        return None

    def run(a):
        return 0

    cmd = Command("Do a thing.", add, run)
    assert (cmd.help, cmd.add_arguments, cmd.run) == ("Do a thing.", add, run)
    assert not hasattr(cmd, "name")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Command("thing", "Do a thing.", add, run) == cmd
        assert Command(name="thing", help="Do a thing.", add_arguments=add, run=run) == cmd
        assert k2_core.cli.Command is Command
    assert [w.category for w in caught] == [DeprecationWarning] * 3
    with pytest.raises(TypeError, match="missing"):
        Command("Do a thing.", add)
