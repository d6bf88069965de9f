"""The lm-evaluation-harness adapter: a `k2` model type over a k2 checkpoint.

    from k2_rl.evaluation.lm_eval_adapter import K2LM   # registers the model type "k2"
    lm_eval.simple_evaluate(model="k2", model_args="path=runs/tiny/checkpoints/step_00000200",
                            tasks=[...])

Loglikelihood requests are scored in batches of `batch_size` (longest first, right-padded,
one forward each); `generate_until` goes through k2's KV-cache engine. lm-eval 0.4 finds
model types only in its own registry (no entry points), so this module must be imported
before lm-eval resolves `--model k2`: `k2 lm-eval ...` and
`python -m k2_rl.evaluation.lm_eval_cli ...` do that, then run lm-eval's own command line.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


def _int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):  # e.g. batch_size="auto"
        return default


@register_model("k2")
class K2LM(LM):
    """A k2 checkpoint as an lm-eval model: `path` (checkpoint URI), optional `tokenizer`
    (saved tokenizer folder), `batch_size`, `max_length` (default: the model's positions)."""

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        from .target import load_target

        self.target = load_target(path, tokenizer=tokenizer)
        self.model = self.target.model
        self.tok = self.target.tokenizer
        self.batch_size = max(1, _int(batch_size, 16))
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

    # -- tokenization ---------------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids); trailing spaces of the context move to the
        continuation, and the continuation is what encoding the whole adds to the context."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return [self.tok.eos_id], self.tok.encode(continuation)
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if whole[: len(ctx)] != ctx:  # the merge crossed the boundary: encode apart
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx) :]

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives it, per pair."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[:-1][-self.max_length :] for i in idx]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
            logp = torch.log_softmax(self.model(ids, return_logits=True).logits.float(), dim=-1)
            for j, i in enumerate(idx):
                cont = pairs[i][1]
                end = len(rows[j])
                lp = logp[j, end - len(cont) : end]
                want = torch.tensor(cont)
                out[i] = (
                    float(lp.gather(1, want[:, None]).sum()),
                    bool((lp.argmax(-1) == want).all()),
                )
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """log p(continuation | context) and is-greedy for each (context, continuation)."""
        pairs = [self._pair(*r.args[:2]) for r in requests]
        res = self._score(pairs)
        for r, v in zip(requests, res, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, v)
        return res

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """log p(text) of each whole text, in disjoint windows of max_length tokens."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for k, r in enumerate(requests):
            toks = self.tok.encode(r.args[0])
            for w in get_rolling_token_windows(toks, self.tok.eos_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        scores = self._score(windows)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores, strict=True):
            totals[k] += lp
        for r, v in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, v)
        return totals

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Continue each context until a stop string (`until`) or `max_gen_toks`, through the
        KV-cache engine; greedy unless `do_sample` with a temperature is asked for."""
        from k2_data.inference.engine import SamplingParams

        from .generate import cut_at_stop

        prompts, params, stops = [], [], []
        for k, r in enumerate(requests):
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kw.get("max_gen_toks", self.max_gen_toks))
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = self.tok.encode(context)[-max(1, self.max_length - budget) :] or [self.tok.eos_id]
            prompts.append(ids)
            params.append(
                SamplingParams(
                    temperature=temp,
                    top_p=float(kw.get("top_p", 1.0)),
                    max_new_tokens=budget,
                    stop=until,
                    seed=k,
                )
            )
            stops.append(until)
        comps = self.target.engine(self.batch_size).generate(prompts, params)
        texts = [cut_at_stop(c.text or "", s) for c, s in zip(comps, stops, strict=True)]
        for r, t in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", r.args, t)
        return texts
