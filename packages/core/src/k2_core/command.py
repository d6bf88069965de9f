"""The `Command` a plugin's `command` factory returns: a `k2` subcommand, light to import.

The subcommand's name is the name it is registered under in the `command` slot.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, init=False)
class Command:
    """A subcommand: its help line, how it adds its arguments, and what it runs (exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`Command(help, add_arguments, run)`; a leading name (the old form) is deprecated."""
        if "name" in kwargs:
            kwargs.pop("name")
            _warn_name()
        elif args and len(args) + len(kwargs) == 4:  # Command(name, help, add_arguments, run)
            args = args[1:]
            _warn_name()
        names = ("help", "add_arguments", "run")
        if len(args) > len(names):
            raise TypeError(f"Command takes {len(names)} arguments, got {len(args)}")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"Command got an unexpected or repeated argument {key!r}")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"Command missing argument(s): {', '.join(missing)}")
        for key in names:
            object.__setattr__(self, key, values[key])


def _warn_name() -> None:
    warnings.warn(
        "Command's name argument is deprecated and ignored (the command's name is the "
        "one it is registered under): use Command(help, add_arguments, run)",
        DeprecationWarning,
        stacklevel=3,
    )
