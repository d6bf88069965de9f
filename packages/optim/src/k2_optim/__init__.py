"""k2_optim."""

__version__ = "0.1.0"
