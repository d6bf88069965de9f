"""Knowledge and math rephrasing (`k2 rephrase`): styles, chunking, fidelity, the stage."""

from .config import FidelityConfig, RephraseConfig, SamplingConfig
from .styles import Style, get_style, register_style, style_names

__all__ = [
    "FidelityConfig",
    "RephraseConfig",
    "SamplingConfig",
    "Style",
    "get_style",
    "register_style",
    "style_names",
    "run_rephrase",
]


def run_rephrase(cfg: RephraseConfig):  # noqa: ANN201 - RunSummary, imported lazily
    """Run (or resume) the rephrasing pipeline of `cfg`; its RunSummary."""
    from ..pipeline.engine import run_pipeline
    from .stage import RephraseStage

    return run_pipeline(RephraseStage(cfg), cfg.pipeline)
