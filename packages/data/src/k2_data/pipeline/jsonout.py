"""Reading the JSON object a model was asked for out of its free-text reply."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


class MalformedOutput(ValueError):
    """A model reply that does not hold the JSON asked for; counted as `malformed_output`."""

    error_kind = "malformed_output"


def extract_json(text: str | None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first JSON object in `text` (a ```json fence or the outermost braces) holding every
    key of `required`; MalformedOutput otherwise."""
    if not text:
        raise MalformedOutput("empty reply where JSON was asked for")
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict) and all(k in obj for k in required):
            return obj
    need = f" with keys {', '.join(required)}" if required else ""
    raise MalformedOutput(f"no JSON object{need} in the reply")
