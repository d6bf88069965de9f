"""The shipped sft-math / rl-math pair: RL prompts are problems the SFT data did not hold.

The first demo drew its RL prompts from the very stream the SFT conversations came from, so RL
trained on memorised answers (rollout reward 0.92 against 0.79 on held-out problems) and had
nothing to teach.
"""

from __future__ import annotations

import itertools

from k2_core.configio import load_config
from k2_rl.chat_data import builtin_math_records
from k2_rl.commands import config_path
from k2_rl.options import ChatDataOptions, RlOptions
from k2_rl.prompts import PromptStream


def _sft_questions() -> set[str]:
    cfg = load_config(config_path("sft-math"), [])
    o = ChatDataOptions.model_validate(cfg.data.options)
    recs = builtin_math_records("train", o.builtin_n, o.difficulty, o.kinds, cfg.train.seed)
    return {r["messages"][0]["content"] for r in recs}


def _rl_questions(overrides: list[str]) -> list[str]:
    cfg = load_config(config_path("rl-math"), ["plugins.rl.init=unused", *overrides])
    opts = RlOptions.model_validate(cfg.plugins["rl"])
    stream = PromptStream(opts.tasks, lambda m: [], cfg.train.seed + opts.seed_offset, 96)
    n = opts.prompts_per_iter * cfg.train.steps
    return [rec["prompt"] for rec, *_ in itertools.islice(stream, n)]


def test_rl_math_prompts_are_not_the_sft_conversations():
    sft = _sft_questions()
    rl = _rl_questions([])
    seen = sum(q in sft for q in rl) / len(rl)
    assert seen < 0.1, f"{seen:.0%} of the RL prompts are SFT questions"
    # the failure this guards against: the same stream as the SFT data
    same = _rl_questions(
        ["plugins.rl.seed_offset=0", "plugins.rl.tasks=[{name: math, difficulty: [1, 2]}]"]
    )
    assert sum(q in sft for q in same) / len(same) == 1.0
