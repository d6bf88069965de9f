"""`train.compile`: regional torch.compile of each decoder block (k2_core.compile).

Compiled and eager runs of the same config agree: the first fp32 step within 1e-5 relative in
the loss and every layer's max logit (QK-Clip's input), 20 fp32 steps within 1e-3, bf16 within
BF16_TOL; a checkpoint written compiled resumes eager and vice versa; no region breaks its
graph; an activation policy with compile is refused in one line. Slow: the first compile of
the block graphs takes a minute or more on a shared CPU (torch caches them across runs).
"""

from __future__ import annotations

import pytest
import torch
from toy_run import make

pytestmark = pytest.mark.slow

NO_TRACK = "tracking.tracker=null"
# bf16 autocast: the compiled graphs fuse elementwise work that eager rounds to bf16 between
# ops, so the two differ by bf16 rounding (2^-8 relative per op), not float order alone: the
# loss within 1e-2 relative on every step; the max logits (about 0.06 on this model, so
# sensitive to the weights' bf16-rounded updates) within 1e-2 on the first step, 5e-2 after
BF16_TOL = 1e-2
BF16_LOGIT_TOL = 5e-2


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _layer_logits(h: dict[str, float]) -> list[float]:
    return [v for k, v in sorted(h.items()) if k.startswith("attn/max_logit/layer_")]


def _train(tmp_path, *extra: str):
    from k2_core.orchestrator import train

    run = make(tmp_path, NO_TRACK, *extra)
    train(run)
    return run


def test_compiled_fp32_matches_eager_and_breaks_no_graph(tmp_path):
    from torch._dynamo.utils import counters

    args = ("train.steps=20", "checkpoint.every=100", "train.eval_every=10")
    eager = _train(tmp_path / "eager", *args)
    counters.clear()
    compiled = _train(tmp_path / "compiled", *args, "train.compile=true")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # the regions did compile
    e, c = eager.history, compiled.history
    assert len(e) == len(c) == 20
    assert _rel(c[0]["train/loss"], e[0]["train/loss"]) < 1e-5
    le, lc = _layer_logits(e[0]), _layer_logits(c[0])
    assert len(le) == 2 and all(_rel(x, y) < 1e-5 for x, y in zip(lc, le, strict=True)), (lc, le)
    for he, hc in zip(e, c, strict=True):
        assert _rel(hc["train/loss"], he["train/loss"]) < 1e-3, (hc, he)
        assert all(
            _rel(x, y) < 1e-3 for x, y in zip(_layer_logits(hc), _layer_logits(he), strict=True)
        )
    assert _rel(c[-1]["eval/loss"], e[-1]["eval/loss"]) < 1e-3
    # the routed experts saw every token: the load counts of both runs are the same
    se, sc = eager.model.load_stats(), compiled.model.load_stats()
    assert all(torch.equal(se[i]["counts"], sc[i]["counts"]) for i in se)


def test_compiled_bf16_matches_eager_within_tolerance(tmp_path):
    args = ("train.steps=5", "checkpoint.every=100", "train.eval_every=0", "train.bf16=true")
    e = _train(tmp_path / "eager", *args).history
    c = _train(tmp_path / "compiled", *args, "train.compile=true").history
    for i, (he, hc) in enumerate(zip(e, c, strict=True)):
        assert _rel(hc["train/loss"], he["train/loss"]) < BF16_TOL, (hc, he)
        tol = BF16_TOL if i == 0 else BF16_LOGIT_TOL
        le, lc = _layer_logits(he), _layer_logits(hc)
        assert all(_rel(x, y) < tol for x, y in zip(lc, le, strict=True)), (i, lc, le)


@pytest.mark.parametrize("first,second", [("true", "false"), ("false", "true")])
def test_checkpoint_resumes_across_compile(tmp_path, first, second):
    args = ("train.eval_every=0", "checkpoint.every=3")
    straight = _train(tmp_path / "straight", "train.steps=6", *args)
    half = _train(tmp_path / "b", "train.steps=3", *args, f"train.compile={first}")
    resumed = make(tmp_path / "b", NO_TRACK, "train.steps=6", *args, f"train.compile={second}")
    assert resumed.step == 3
    from k2_core.orchestrator import train

    train(resumed)
    got = [h["train/loss"] for h in half.history + resumed.history]
    want = [h["train/loss"] for h in straight.history]
    assert all(_rel(g, w) < 1e-4 for g, w in zip(got, want, strict=True)), (got, want)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-3, atol=1e-5) for k in sa)


def test_activation_policy_with_compile_is_refused_in_one_line(tmp_path):
    from k2_core.compile import compile_blocks
    from k2_core.errors import ConfigError
    from k2_hw_h800.activations import apply_activation_policy

    run = make(tmp_path, NO_TRACK, "train.steps=1")
    apply_activation_policy(run.model, {"recompute": True, "fp8_storage": True})
    with pytest.raises(ConfigError) as e:
        compile_blocks(run.model)
    msg = str(e.value)
    assert "\n" not in msg and "train.compile" in msg and "activation_policy" in msg
    assert "recompute" in msg and "fp8_storage" in msg
    apply_activation_policy(run.model, {})  # an empty policy is no policy: allowed
    compile_blocks(run.model)


def test_decoding_with_a_cache_stays_eager_and_equal(tmp_path):
    from k2_core.compile import compile_blocks

    run = make(tmp_path, NO_TRACK, "train.steps=1")
    model = run.model.eval()
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        want = model(ids, cache=cache).logits
        compile_blocks(model)
        cache = model.new_cache(1, 16)
        got = model(ids, cache=cache).logits
    torch.testing.assert_close(got, want)


@pytest.mark.distributed
def test_expert_parallel_compiled_matches_single_process_eager(tmp_path, monkeypatch):
    """h800 with ep=2 (2 gloo processes) and train.compile: the all-to-all's host sync sits
    outside the compiled regions (the router is compiled, the dispatch is not) and the losses
    equal the eager single-process run on the same global batch."""
    from backend_runs import EXACT_NS, distributed_losses, small_model, train_losses

    monkeypatch.setenv("K2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("K2_LOAD_PLUGINS", "optim,moe,data,hw_h800")
    shrink = [
        *small_model(),
        "train.steps=4",
        "train.micro_batch_size=1",
        "train.log_every=1",
        "train.eval_every=0",
        NO_TRACK,
        "checkpoint.every=100",
        *EXACT_NS,
    ]
    want = train_losses(shrink, ["train.grad_accum=2", f"checkpoint.dir={tmp_path / 'one'}"])
    got = distributed_losses(
        2,
        str(tmp_path / "cache"),
        shrink,
        ["parallel.options.ep=2", "train.compile=true", f"checkpoint.dir={tmp_path / 'ep'}"],
        str(tmp_path / "losses"),
    )
    assert got[0] == got[1]
    # float order differs (compiled kernels, all-reduce, expert batching); routing is tie-free
    assert all(_rel(g, w) < 1e-4 for g, w in zip(got[0], want, strict=True)), (got[0], want)
