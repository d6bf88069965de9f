"""The library of rewriting styles and perspectives (K2's knowledge and math rephrasing).

A style is a system prompt plus an instruction. Built-in ones are below; a config adds its own
under `custom_styles:`, and Python code (a plugin's `k2_register`, say) adds more with
`register_style(Style(...))` before the run. Names are unique: registering a taken name is an
error unless `replace=True`.
"""

from __future__ import annotations

from typing import Literal

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field


class Style(BaseModel):
    """One rewriting style or perspective."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(..., description="Unique name, recorded in every output's provenance.")
    kind: Literal["rephrase", "notes", "translate"] = Field(
        "rephrase",
        description="rephrase: same facts, new wording; notes: math learning notes; "
        "translate: into English.",
    )
    system: str = Field(..., description="System prompt of the rewriting model.")
    instruction: str = Field(..., description="What to do with the passage (user prompt head).")


_SYSTEM = (
    "You rewrite text for a language-model training corpus. Keep every fact, name, number "
    "and relation of the original; add nothing that is not in it; do not comment on the "
    "task. Reply with the rewritten text only."
)

_BUILTIN = [
    Style(
        name="encyclopedic",
        system=_SYSTEM,
        instruction="Rewrite the passage in a neutral, encyclopedic register, like a "
        "reference-work entry.",
    ),
    Style(
        name="plain_explainer",
        system=_SYSTEM,
        instruction="Rewrite the passage in plain words for a curious teenager, keeping every "
        "detail.",
    ),
    Style(
        name="textbook",
        system=_SYSTEM,
        instruction="Rewrite the passage as a textbook paragraph that states each fact "
        "clearly, in a logical order.",
    ),
    Style(
        name="news_report",
        system=_SYSTEM,
        instruction="Rewrite the passage as a short factual news report.",
    ),
    Style(
        name="question_answer",
        system=_SYSTEM,
        instruction="Rewrite the passage as a series of questions, each followed by its "
        "answer taken from the passage.",
    ),
    Style(
        name="expert_perspective",
        system=_SYSTEM,
        instruction="Rewrite the passage from the perspective of a domain expert explaining it "
        "to a colleague.",
    ),
    Style(
        name="student_summary",
        system=_SYSTEM,
        instruction="Rewrite the passage as a diligent student's complete study notes, in "
        "full sentences.",
    ),
    Style(
        name="varied_syntax",
        system=_SYSTEM,
        instruction="Rewrite the passage with different sentence structure and vocabulary, "
        "same meaning.",
    ),
    Style(
        name="learning_notes",
        kind="notes",
        system=_SYSTEM + " You are a patient math tutor.",
        instruction="Rewrite the math material as learning notes: state the problem, the "
        "idea behind each step, the worked steps with every number kept, and the final "
        "answer.",
    ),
    Style(
        name="translate_en",
        kind="translate",
        system="You translate text into fluent English. Keep every fact, name and number. "
        "Reply with the translation only.",
        instruction="Translate the passage into English.",
    ),
]

_REGISTRY: dict[str, Style] = {s.name: s for s in _BUILTIN}

DEFAULT_REPHRASE = (
    "encyclopedic",
    "plain_explainer",
    "textbook",
    "news_report",
    "question_answer",
    "expert_perspective",
    "student_summary",
    "varied_syntax",
)


def register_style(style: Style, *, replace: bool = False) -> None:
    """Add a style to the library (a ConfigError if its name is taken, unless `replace`)."""
    if style.name in _REGISTRY and not replace:
        raise ConfigError(f"style {style.name!r} exists already; pick another name")
    _REGISTRY[style.name] = style


def style_names() -> list[str]:
    """Every registered style name."""
    return sorted(_REGISTRY)


def get_style(name: str, extra: dict[str, Style] | None = None) -> Style:
    """A style by name (config-defined `extra` first); ConfigError naming the valid ones."""
    if extra and name in extra:
        return extra[name]
    if name not in _REGISTRY:
        valid = ", ".join(sorted({*_REGISTRY, *(extra or {})}))
        raise ConfigError(f"styles: unknown style {name!r}; valid: {valid}")
    return _REGISTRY[name]
