"""A softmax top-k router for k2's `router` slot."""

__version__ = "0.1.0"
