"""The demo's paired comparison of greedy answers before and after RL."""

from __future__ import annotations

import pytest
from k2_rl.demo import paired_flips


def test_paired_flips_counts_changed_answers_and_their_sign_test():
    before = [False] * 10 + [True] * 10
    after = [True] * 8 + [False] * 2 + [False] + [True] * 9
    f = paired_flips(before, after)
    assert (f["fixed"], f["broken"]) == (8, 1)
    # two-sided binomial on the 9 changed answers: 2 * (C(9,0) + C(9,1)) / 2^9
    assert f["p_value"] == pytest.approx(2 * 10 / 512)


def test_paired_flips_without_changes_is_no_evidence():
    assert paired_flips([True, False], [True, False]) == {"fixed": 0, "broken": 0, "p_value": 1.0}
    assert paired_flips([False] * 3, [True] * 3)["p_value"] == pytest.approx(0.25)
