"""The `k2` command line: every subcommand comes from the `command` slot."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from .command import Command as _Command
from .errors import K2Error


def __getattr__(name: str) -> Any:
    """`k2_core.cli.Command`: a deprecated alias of `k2_core.command.Command` (one release)."""
    if name == "Command":
        warnings.warn(
            "k2_core.cli.Command moved to k2_core.command.Command; the old path goes "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return _Command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `k2: usage error:` line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"k2: usage error: {self.prog}: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser with one subcommand per registered `command`."""
    from . import __version__
    from .plugins import get_plugins

    plugins = get_plugins()
    parser = _Parser(
        prog="k2",
        description="Train and post-train Kimi-K2-style mixture-of-experts models.",
    )
    parser.add_argument("--version", action="version", version=f"k2-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    if plugins.failures and "plugins" not in sys.argv[1:2]:
        names = ", ".join(f.name for f in plugins.failures)
        sys.stderr.write(f"k2: warning: plugin(s) failed to load: {names} (see `k2 plugins`)\n")
    registry = plugins.registry
    for name in registry.names("command"):
        try:
            cmd: _Command = registry.build("command", name)
        except K2Error as e:  # a plugin's broken command must not take the others down
            sys.stderr.write(f"k2: warning: {e}\n")
            continue
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `k2` script."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        run = getattr(args, "_run", None)
        if run is None:
            parser.print_help()
            return 2
        return int(run(args) or 0)
    except K2Error as e:
        print(f"k2: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a command may say what it kept: KeyboardInterrupt(text)
        print("k2: interrupted" + (f"; {e.args[0]}" if e.args else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
