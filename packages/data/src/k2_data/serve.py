"""Deprecated: moved to k2_data.inference.server."""

from ._moved import alias

alias(__name__, "k2_data.inference.server")
