"""k2-rl registers the math, code and instruction rewards with strict, documented options."""

from __future__ import annotations

import pytest
from k2_core.errors import ConfigError
from k2_core.plugins import load_plugins
from k2_rl.rewards import Reward
from k2_rl.rewards.options import CodeRewardOptions, InstructionRewardOptions, MathRewardOptions


def test_k2_register_rewards():
    reg = load_plugins().registry
    assert {"math", "code", "instruction"} <= set(reg.names("reward"))
    for name, opts in (
        ("math", MathRewardOptions),
        ("code", CodeRewardOptions),
        ("instruction", InstructionRewardOptions),
    ):
        r = reg.get("reward", name)
        assert r.options is opts and r.distribution == "k2-rl" and r.doc
        assert opts.model_config["frozen"] and opts.model_config["extra"] == "forbid"
        assert all(f.description for f in opts.model_fields.values())
    math = reg.build("reward", "math", options={"no_answer_score": -1.0})
    assert isinstance(math, Reward) and math.score({"answer": "2"}, ["1+1 = 2"])[0].score == 1.0
    code = reg.build("reward", "code", options={"partial_credit": True, "sandbox": {"wall_s": 2}})
    assert code.options.sandbox.wall_s == 2.0
    instr = reg.build("reward", "instruction", options={"all_or_nothing": True})
    assert instr.score({"rules": [{"kind": "words", "max": 2}]}, ["a b c"])[0].score == 0.0


def test_reward_options_are_strict():
    reg = load_plugins().registry
    with pytest.raises(ConfigError, match="partial_credt"):
        reg.options("reward", "code", {"partial_credt": True}, "rl.reward_options")
    with pytest.raises(ConfigError):
        reg.options("reward", "code", {"sandbox": {"wall_s": -1}}, "rl.reward_options")
