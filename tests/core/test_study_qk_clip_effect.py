"""The qk_clip study's claim at test scale (issue 17: a test that can fail). In its own file so
the parallel suite (`--dist loadfile`) can run it beside test_studies.py's other slow runs."""

from __future__ import annotations

import pytest
from k2_core.studies import run_study
from test_studies import SMALL


@pytest.mark.slow
def test_qk_clip_holds_the_max_logit_where_plain_muon_runs_away(tmp_path, monkeypatch):
    """The study's claim at test scale (45 steps of a 2-layer width-64 model, lr and tau chosen
    here so the effect shows): plain Muon's max logit passes 5 x tau, MuonClip's stays near tau.

    The clipped arm's peak is the pre-clip value of the forward after the logits first cross
    tau: one step's growth at this aggressive lr overshoots to about 2 x tau (measured 2.03x,
    settling at 1.3x), so the bound is 2.5 x tau, with 1.5 x tau on the last step."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tau = 3.0
    result = run_study(
        "qk_clip", str(tmp_path / "qk"), scale=0.15, overrides=SMALL, lr=0.08, tau=tau, echo=None
    )
    muon, clip = result["arms"]["muon"], result["arms"]["muonclip"]
    assert muon["peak_max_logit"] > 5 * tau, muon
    assert clip["peak_max_logit"] <= 2.5 * tau and clip["final_max_logit"] <= 1.5 * tau, clip
