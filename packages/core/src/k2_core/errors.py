"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations


class K2Error(Exception):
    """An error the user can act on; the CLI prints `k2: <kind> error: <message>` and exits 2."""

    kind = "k2"
    exit_code = 2

    def __str__(self) -> str:
        return f"{self.kind} error: {self.args[0] if self.args else ''}"


class ConfigError(K2Error):
    """Invalid configuration: unknown key, wrong type, bad value, missing or malformed file."""

    kind = "config"


class PluginError(K2Error):
    """An unknown implementation name, or a plugin that cannot provide what was asked."""

    kind = "plugin"


class CheckpointError(K2Error):
    """A checkpoint or weight file that is missing, incomplete or does not match the model."""

    kind = "checkpoint"
