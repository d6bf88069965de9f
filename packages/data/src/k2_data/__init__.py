"""k2_data."""

__version__ = "0.1.0"
