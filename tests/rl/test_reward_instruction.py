"""The `instruction` reward: each rule kind, scoring modes, rule validation, language detection."""

from __future__ import annotations

import pytest
from k2_core.errors import ConfigError
from k2_rl.rewards.instruction_reward import InstructionReward
from k2_rl.rewards.language import detect_language
from k2_rl.rewards.options import InstructionRewardOptions
from k2_rl.rewards.rules import parse_rules


def _met(rule: dict, text: str) -> bool:
    return parse_rules([rule])[0].check(text)[0]


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        ({"kind": "words", "min": 3, "max": 5}, "one two three four", "one two"),
        ({"kind": "chars", "max": 10}, "  short  ", "this is far too long"),
        ({"kind": "bullets", "min": 3}, "- a\n* b\n1. c", "- a\n- b"),
        ({"kind": "paragraphs", "min": 2, "max": 2}, "para one.\n\npara two.", "one\ntwo"),
        ({"kind": "starts_with", "text": "Dear"}, "  dear Sir", "Hello"),
        (
            {"kind": "ends_with", "text": "Thanks.", "case_sensitive": True},
            "ok. Thanks.\n",
            "thanks.",
        ),
        (
            {"kind": "include", "keywords": ["muon", "clip"]},
            "Muon with clip.",
            "Muon only; clipping",
        ),
        ({"kind": "include", "keywords": ["k2"], "min_count": 2}, "k2 and K2", "k2 once"),
        ({"kind": "exclude", "keywords": ["sorry"]}, "Here it is.", "Sorry, no."),
        ({"kind": "json", "required_keys": ["name"]}, '```json\n{"name": "k2"}\n```', '{"id": 1}'),
        ({"kind": "json"}, "[1, 2]", "{not json}"),
        (
            {"kind": "language", "language": "fr"},
            "Le modèle est dans la maison avec nous.",
            "The model is in the house with us.",
        ),
        ({"kind": "case", "case": "lower"}, "all lower 123", "Not Lower"),
    ],
)
def test_each_rule(rule, good, bad):
    assert _met(rule, good) and not _met(rule, bad)


def test_language_detector():
    samples = {
        "en": "The weather is nice and the children are playing outside.",
        "de": "Das Wetter ist schön und die Kinder sind nicht im Haus.",
        "es": "El tiempo es bueno y los niños están en la casa.",
        "zh": "今天天气很好。",
        "ja": "今日はいい天気ですね。",
        "ru": "Сегодня хорошая погода.",
        "ko": "오늘 날씨가 좋네요",
        "unknown": "12345 !!!",
    }
    for want, text in samples.items():
        assert detect_language(text) == want, text


def test_instruction_reward_fraction_and_all_or_nothing():
    task = {
        "prompt": "Write two bullets about MoE, under 20 words, no 'sorry'.",
        "rules": [
            {"kind": "bullets", "min": 2, "max": 2},
            {"kind": "words", "max": 20},
            {"kind": "exclude", "keywords": ["sorry"]},
            {"kind": "include", "keywords": ["experts"]},
        ],
    }
    good = "- experts are sparse\n- a router picks experts"
    half = "Sorry: experts route tokens."
    none = "Sorry " * 30
    res = InstructionReward().score(task, [good, half, none])
    assert [r.score for r in res] == [1.0, 0.5, 0.0]
    assert [r.outcome for r in res] == ["pass", "partial", "fail"]
    assert "bullets" in res[1].detail and "exclude" in res[1].detail
    strict = InstructionReward(InstructionRewardOptions(all_or_nothing=True)).score(
        task, [good, half]
    )
    assert [r.score for r in strict] == [1.0, 0.0]


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="rules.0"):
        parse_rules([{"kind": "haiku"}])
    with pytest.raises(ConfigError, match="min"):
        parse_rules([{"kind": "words", "min": -1}])
    with pytest.raises(ConfigError, match="rules"):
        InstructionReward().score({"prompt": "p"}, ["x"])
