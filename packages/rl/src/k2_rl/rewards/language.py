"""A small language detector: Unicode script first, then stopwords for Latin-script languages."""

from __future__ import annotations

import re
import unicodedata

# distinctive, frequent function words; shared ones ("de", "a", "en") are left out
_STOPWORDS = {
    "en": "the and of to is that it was for with as are this have be not you they which".split(),
    "fr": "le les des est une dans que pour pas qui sur avec sont cette nous vous mais "
    "être".split(),
    "de": "der die das und ist nicht ein eine ich mit sich auf für dem den auch wird sind".split(),
    "es": "el los las es una por que del con para como pero más está son muy sus".split(),
    "it": "il gli della che è per una sono con non del nella anche questo più alla".split(),
    "pt": "os uma não que com para por dos das mais foi está são também pelo muito".split(),
    "nl": "het een van en is dat niet zijn op voor met ook wordt maar dit aan".split(),
}
_STOPSETS = {lang: frozenset(words) for lang, words in _STOPWORDS.items()}
_SCRIPTS = (
    ("CJK", "han"),
    ("HIRAGANA", "kana"),
    ("KATAKANA", "kana"),
    ("HANGUL", "ko"),
    ("CYRILLIC", "ru"),
    ("GREEK", "el"),
    ("ARABIC", "ar"),
    ("HEBREW", "he"),
    ("DEVANAGARI", "hi"),
    ("THAI", "th"),
    ("LATIN", "latin"),
)
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)


def _script(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    return next((code for key, code in _SCRIPTS if name.startswith(key)), None)


def detect_language(text: str) -> str:
    """An ISO 639-1 code for `text` ('en', 'fr', 'zh', 'ru', ...) or 'unknown'."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha() and (s := _script(ch)):
            counts[s] = counts.get(s, 0) + 1
    if not counts:
        return "unknown"
    top = max(counts, key=counts.__getitem__)
    if top in ("han", "kana"):
        return "ja" if counts.get("kana", 0) > 0.1 * counts.get("han", 0) else "zh"
    if top != "latin":
        return top
    words = [w.lower() for w in _WORD_RE.findall(text)]
    hits = {lang: sum(w in stop for w in words) for lang, stop in _STOPSETS.items()}
    best = max(hits, key=hits.__getitem__)
    return best if hits[best] > 0 else "unknown"
