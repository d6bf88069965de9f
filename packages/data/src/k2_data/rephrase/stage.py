"""The rephrasing stage: one item per (document, style); chunk-wise autoregressive rewriting,
then fidelity checks; records with provenance for `k2 data prepare`."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from ..pipeline.engine import ItemResult
from ..pipeline.options import build_generator
from .chunking import count_tokens, split_chunks
from .config import RephraseConfig
from .fidelity import EmbeddingScorer, judge_messages, lexical_similarity, parse_verdict
from .styles import Style, get_style

_WORD = re.compile(r"[^\W\d_]+", re.U)
_EN_COMMON = frozenset(
    "the of and to in is was for on that with as by are from at his it "
    "an be this which or has its were their".split()
)


def looks_english(text: str) -> bool:
    """Whether `text` reads as English: Latin letters and common English function words."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return True
    ascii_share = sum(w.isascii() for w in words) / len(words)
    common = sum(w in _EN_COMMON for w in words) / len(words)
    return ascii_share > 0.9 and common >= 0.12


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _tail_tokens(text: str, budget: int) -> str:
    """The end of `text`, about `budget` tokens, cut at a word boundary."""
    if budget <= 0 or not text:
        return ""
    words = text.split(" ")
    out: list[str] = []
    n = 0
    for w in reversed(words):
        n += count_tokens(w)
        if n > budget:
            break
        out.append(w)
    return " ".join(reversed(out))


def rewrite_messages(
    style: Style, chunk: str, so_far: str, index: int, total: int
) -> list[dict[str, str]]:
    """The chat rewriting chunk `index` of `total`, conditioned on the rewrite so far."""
    parts = [style.instruction]
    if total > 1:
        parts.append(
            f"This is part {index + 1} of {total} of a longer document; continue the "
            "rewrite so that it follows on from the rewrite so far without repeating it."
        )
    if so_far:
        parts.append(f"<rewrite_so_far>\n{so_far}\n</rewrite_so_far>")
    parts.append(f"<passage>\n{chunk}\n</passage>")
    return [
        {"role": "system", "content": style.system},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


class RephraseStage:
    """Stage of `k2 rephrase` for the pipeline engine."""

    name = "rephrase"

    def __init__(self, cfg: RephraseConfig):
        self.cfg = cfg
        self._extra = {s.name: s for s in cfg.custom_styles}
        for n in cfg.style_list():
            get_style(n, self._extra)  # unknown names fail before any work

    def identity(self) -> dict[str, Any]:
        """Everything that decides the records (not the output folder, nor the executor)."""
        d = self.cfg.model_dump(mode="json", exclude={"pipeline", "generator"})
        d["generator"] = self.cfg.generator.identity()
        return d

    def items(self) -> Iterator[dict[str, Any]]:
        """(document, style) items: each document gets `n_rephrasings` distinct styles."""
        from collections import Counter

        from ..sources import read_source

        cfg, names = self.cfg, self.cfg.style_list()
        skipped: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        n = 0
        for doc in read_source(cfg.source, cfg.seed, skipped):
            if not doc.text.strip():
                continue
            if cfg.max_docs is not None and n >= cfg.max_docs:
                break
            n += 1
            seen[doc.id] += 1
            did = doc.id if seen[doc.id] == 1 else f"{doc.id}#{seen[doc.id]}"
            start = _stable(f"{cfg.seed}:{did}") % len(names)
            for k in range(cfg.n_rephrasings):
                style = names[(start + k) % len(names)]
                yield {
                    "id": f"{did}::{style}",
                    "source_id": did,
                    "style": style,
                    "domain": doc.domain,
                    "text": doc.text,
                }

    def make_processor(self) -> RephraseProcessor:
        """A processor holding this process's generator(s) and embedding model."""
        return RephraseProcessor(self.cfg, self._extra)


class RephraseProcessor:
    """Rewrites one item chunk by chunk and checks it."""

    def __init__(self, cfg: RephraseConfig, extra: dict[str, Style]):
        self.cfg, self.extra = cfg, extra
        self.gen: Any = build_generator(cfg.generator)
        fj = cfg.fidelity.judge_generator
        self.judge: Any = build_generator(fj, "fidelity.judge_generator") if fj else self.gen
        self.embed = (
            EmbeddingScorer(cfg.fidelity.embedding_model)
            if cfg.fidelity.method == "embedding"
            else None
        )

    def _gen_info(self) -> dict[str, Any]:
        d = getattr(self.gen, "describe", None)
        return d() if callable(d) else {"name": self.cfg.generator.name}

    async def __call__(self, item: dict[str, Any]) -> ItemResult:
        """Rewrite, check, and return the record (or the rejection reason)."""
        cfg, text = self.cfg, item["text"]
        style = get_style(item["style"], self.extra)
        if style.kind == "translate" and looks_english(text):
            return ItemResult(rejected="already_english")
        chunks = split_chunks(text, cfg.chunk_tokens)
        if not chunks:
            return ItemResult(rejected="empty_source")
        seed = cfg.sampling.seed + _stable(item["id"]) % 1_000_000
        rewritten: list[str] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for i, chunk in enumerate(chunks):
            so_far = _tail_tokens("\n\n".join(rewritten), cfg.context_tokens)
            res = await self.gen.chat(
                rewrite_messages(style, chunk, so_far, i, len(chunks)),
                temperature=cfg.sampling.temperature,
                top_p=cfg.sampling.top_p,
                max_tokens=cfg.sampling.max_tokens,
                seed=seed + i,
            )
            out = (res.message.get("content") or "").strip()
            if not out:
                return ItemResult(rejected="empty_rewrite")
            rewritten.append(out)
            for k in usage:
                usage[k] += int(res.usage.get(k, 0))
        rewrite = "\n\n".join(rewritten)
        fid: dict[str, Any] = {
            "method": cfg.fidelity.method,
            "lexical": round(lexical_similarity(text, rewrite), 4),
        }
        score = fid["lexical"]
        if self.embed is not None:
            fid["embedding"] = round(
                await asyncio.to_thread(self.embed.similarity, text, rewrite), 4
            )
            score = fid["embedding"]
        if cfg.fidelity.method != "none" and style.kind != "translate":
            fid["threshold"] = cfg.fidelity.min_similarity()
            if score < fid["threshold"]:
                return ItemResult(rejected="unfaithful")
        if cfg.fidelity.judge:
            res = await self.judge.chat(
                judge_messages(text, rewrite), temperature=0.0, max_tokens=256, seed=seed
            )
            verdict = parse_verdict(res.message.get("content"))
            fid["judge"] = verdict
            if not verdict["faithful"] or verdict["score"] < cfg.fidelity.judge_threshold:
                return ItemResult(rejected="judge_unfaithful")
        record = {
            "id": item["id"],
            "text": rewrite,
            "source_id": item["source_id"],
            "domain": cfg.domain or f"{item['domain']}_rephrased",
            "style": style.name,
            "mode": cfg.mode,
            "chunks": {
                "n": len(chunks),
                "budget": cfg.chunk_tokens,
                "tokens": [count_tokens(c) for c in chunks],
            },
            "generator": self._gen_info(),
            "fidelity": fid,
            "usage": usage,
        }
        return ItemResult(records=[record])

    def stats(self) -> dict[str, int]:
        """The generator's usage counters."""
        return dict(getattr(self.gen, "usage", {}))

    async def aclose(self) -> None:
        """Close the generator(s)."""
        await self.gen.aclose()
        if self.judge is not self.gen:
            await self.judge.aclose()
