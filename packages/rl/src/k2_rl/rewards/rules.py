"""Checkable instruction rules (length, format, keywords, JSON, language), one model per kind.

A task record lists them as dicts, e.g. {"kind": "words", "max": 50}; `parse_rules` validates
them. Each rule's `check(text)` returns (met, why-not).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from k2_core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .language import detect_language

_BULLET_RE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+\S", re.MULTILINE)
_JSON_FENCE_RE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def check(self, text: str) -> tuple[bool, str]:
        """(True, "") when `text` meets the rule, else (False, why)."""
        raise NotImplementedError


class _Range(_Rule):
    min: int | None = Field(None, ge=0, description="Smallest allowed count; None: no minimum.")
    max: int | None = Field(None, ge=0, description="Largest allowed count; None: no maximum.")

    def _in_range(self, n: int, what: str) -> tuple[bool, str]:
        if self.min is not None and n < self.min:
            return False, f"{n} {what} < {self.min}"
        if self.max is not None and n > self.max:
            return False, f"{n} {what} > {self.max}"
        return True, ""


class WordsRule(_Range):
    """Number of words (whitespace-separated) within [min, max]."""

    kind: Literal["words"] = Field(description="Rule kind.")

    def check(self, text: str) -> tuple[bool, str]:
        """Count words."""
        return self._in_range(len(text.split()), "words")


class CharsRule(_Range):
    """Number of characters (surrounding whitespace stripped) within [min, max]."""

    kind: Literal["chars"] = Field(description="Rule kind.")

    def check(self, text: str) -> tuple[bool, str]:
        """Count characters."""
        return self._in_range(len(text.strip()), "chars")


class BulletsRule(_Range):
    """Number of bullet or numbered-list lines within [min, max]."""

    kind: Literal["bullets"] = Field(description="Rule kind.")

    def check(self, text: str) -> tuple[bool, str]:
        """Count list items."""
        return self._in_range(len(_BULLET_RE.findall(text)), "bullets")


class ParagraphsRule(_Range):
    """Number of paragraphs (blocks separated by blank lines) within [min, max]."""

    kind: Literal["paragraphs"] = Field(description="Rule kind.")

    def check(self, text: str) -> tuple[bool, str]:
        """Count paragraphs."""
        paras = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
        return self._in_range(len(paras), "paragraphs")


class StartsWithRule(_Rule):
    """The response starts with `text` (leading whitespace ignored)."""

    kind: Literal["starts_with"] = Field(description="Rule kind.")
    text: str = Field(min_length=1, description="Required beginning.")
    case_sensitive: bool = Field(False, description="Compare case-sensitively.")

    def check(self, text: str) -> tuple[bool, str]:
        """Compare the beginning."""
        got, want = text.lstrip(), self.text
        if not self.case_sensitive:
            got, want = got.lower(), want.lower()
        return (True, "") if got.startswith(want) else (False, f"does not start with {self.text!r}")


class EndsWithRule(_Rule):
    """The response ends with `text` (trailing whitespace ignored)."""

    kind: Literal["ends_with"] = Field(description="Rule kind.")
    text: str = Field(min_length=1, description="Required ending.")
    case_sensitive: bool = Field(False, description="Compare case-sensitively.")

    def check(self, text: str) -> tuple[bool, str]:
        """Compare the ending."""
        got, want = text.rstrip(), self.text
        if not self.case_sensitive:
            got, want = got.lower(), want.lower()
        return (True, "") if got.endswith(want) else (False, f"does not end with {self.text!r}")


def _occurrences(word: str, text: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()))


class IncludeRule(_Rule):
    """Every keyword appears (whole words, case-insensitive) at least `min_count` times."""

    kind: Literal["include"] = Field(description="Rule kind.")
    keywords: list[str] = Field(min_length=1, description="Keywords that must appear.")
    min_count: int = Field(1, ge=1, description="Times each keyword must appear.")

    def check(self, text: str) -> tuple[bool, str]:
        """Find the keywords."""
        missing = [k for k in self.keywords if _occurrences(k, text) < self.min_count]
        return (False, f"missing {missing}") if missing else (True, "")


class ExcludeRule(_Rule):
    """No keyword appears (whole words, case-insensitive)."""

    kind: Literal["exclude"] = Field(description="Rule kind.")
    keywords: list[str] = Field(min_length=1, description="Keywords that must not appear.")

    def check(self, text: str) -> tuple[bool, str]:
        """Find forbidden keywords."""
        found = [k for k in self.keywords if _occurrences(k, text)]
        return (False, f"contains {found}") if found else (True, "")


class JsonRule(_Rule):
    """The response is valid JSON (optionally in a ```json fence), with the required keys."""

    kind: Literal["json"] = Field(description="Rule kind.")
    required_keys: list[str] = Field(
        default_factory=list, description="Keys the top-level JSON object must have."
    )
    allow_fence: bool = Field(True, description="Accept JSON wrapped in a ``` fence.")

    def check(self, text: str) -> tuple[bool, str]:
        """Parse the JSON and look for the keys."""
        body = text.strip()
        if self.allow_fence and (m := _JSON_FENCE_RE.match(body)):
            body = m.group(1)
        try:
            data: Any = json.loads(body)
        except json.JSONDecodeError as e:
            return False, f"invalid JSON: {e.msg}"
        if self.required_keys:
            if not isinstance(data, dict):
                return False, "JSON is not an object"
            missing = [k for k in self.required_keys if k not in data]
            if missing:
                return False, f"JSON lacks keys {missing}"
        return True, ""


class LanguageRule(_Rule):
    """The response is written in `language` (ISO 639-1: en, fr, de, es, it, pt, nl, zh, ...)."""

    kind: Literal["language"] = Field(description="Rule kind.")
    language: str = Field(min_length=2, max_length=3, description="ISO 639-1 code.")

    def check(self, text: str) -> tuple[bool, str]:
        """Detect the language."""
        got = detect_language(text)
        return (True, "") if got == self.language else (False, f"language {got}")


class CaseRule(_Rule):
    """All letters are lowercase (or uppercase)."""

    kind: Literal["case"] = Field(description="Rule kind.")
    case: Literal["lower", "upper"] = Field(description="Required case of every letter.")

    def check(self, text: str) -> tuple[bool, str]:
        """Compare with the text in that case."""
        ok = text == (text.lower() if self.case == "lower" else text.upper())
        return (True, "") if ok else (False, f"not all {self.case}case")


Rule = Annotated[
    WordsRule
    | CharsRule
    | BulletsRule
    | ParagraphsRule
    | StartsWithRule
    | EndsWithRule
    | IncludeRule
    | ExcludeRule
    | JsonRule
    | LanguageRule
    | CaseRule,
    Field(discriminator="kind"),
]
_RULES = TypeAdapter(list[Rule])


def parse_rules(rules: Any) -> list[_Rule]:
    """Validate a record's `rules` list; a ConfigError names the bad rule and field."""
    try:
        return _RULES.validate_python(rules)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"task rules.{where}: {err['msg']}; kinds: words, chars, bullets, "
            "paragraphs, starts_with, ends_with, include, exclude, json, "
            "language, case"
        ) from None
