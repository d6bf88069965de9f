"""`k2 sft` under the h800 backend (issue 16): each rank loads only the init weights it holds,
reads its share of each global batch, and trains through the backend contract; DP2 and PP2
equal one process on the same global batch, and a DP2 checkpoint resumes in one process.
(`k2 rl` under the backend: test_rl_backend.py.)"""

from __future__ import annotations

import pytest
import torch
from rl_fixtures import assert_weights_close, final_weights, run_ranks, tie_free_checkpoint

STEPS = 4
# The runs differ only in float reduction order (fp32 weights: parallel.options.dtype=fp32),
# and routing is made tie-free (rl_fixtures.tie_free_checkpoint keeps the top-2 experts above the
# rest), so no token changes expert: losses agree to a few fp32 ulps of the loss summed over
# steps, weights to ~1e-6 relative; bounds 20-50x that.
LOSS_TOL = 1e-4
WEIGHT_TOL = 5e-5


def _cfg(init: str, run_dir: str, extra: list[str]):
    from k2_core.configio import load_config
    from k2_rl.commands import config_path

    return load_config(
        config_path("sft-math"),
        [
            f"plugins.sft.init={init}",
            f"checkpoint.dir={run_dir}",
            f"train.steps={STEPS}",
            "train.log_every=1",
            "train.eval_every=0",
            "checkpoint.every=2",
            "checkpoint.keep=3",
            "data.seq_len=128",
            "data.options.builtin_n=120",
            "optim.lr=3e-3",
            "optim.schedule_options.warmup_steps=2",
            "tracking.tracker=null",
            "optim.options.ns_dtype=float32",
            "moe.bias_update_speed=0.0",
            *extra,
        ],
    )


def _losses(init: str, run_dir: str, extra: list[str]) -> list[float]:
    """Fine-tune in this process; (first, last) loss of the run."""
    from k2_rl.sft import run_sft

    out = run_sft(_cfg(init, run_dir, extra), progress=False)
    return [out["first_loss"], out["last_loss"]]


def _spawn(world: int, init: str, run_dir: str, extra: list[str]) -> list[float]:
    return run_ranks(
        world,
        "optim,moe,data,hw_h800,rl",
        _losses,
        (init, run_dir, ["parallel.backend=h800", "parallel.options.dtype=fp32", *extra]),
        f"{run_dir}.losses",
    )


def _weights(run_dir: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return final_weights(run_dir, step)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert_weights_close(a, b, WEIGHT_TOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_under_h800_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_LOAD_PLUGINS", "optim,moe,data,hw_h800,rl")
    init = tie_free_checkpoint(tmp_path / "init")
    # DP2: each rank 2 rows a step = one process's 2 micro-batches of 2 (mean of two means)
    one = _losses(init, str(tmp_path / "one"), ["train.micro_batch_size=2", "train.grad_accum=2"])
    dp2 = _spawn(2, init, str(tmp_path / "dp2"), ["train.micro_batch_size=2"])
    assert max(abs(a - b) for a, b in zip(one, dp2, strict=True)) < LOSS_TOL, (one, dp2)
    _close(_weights(str(tmp_path / "one")), _weights(str(tmp_path / "dp2")))
    # PP2: 4 rows cut into 2 pipeline micro-batches, weighted by labelled tokens = one
    # process's single micro-batch of 4
    one4 = _losses(init, str(tmp_path / "one4"), ["train.micro_batch_size=4"])
    pp2 = _spawn(
        2, init, str(tmp_path / "pp2"), ["train.micro_batch_size=4", "parallel.options.pp=2"]
    )
    assert max(abs(a - b) for a, b in zip(one4, pp2, strict=True)) < LOSS_TOL, (one4, pp2)
    _close(_weights(str(tmp_path / "one4")), _weights(str(tmp_path / "pp2")))
    # the DP2 run's step-2 checkpoint resumes in one process: the same last steps
    import shutil

    again = tmp_path / "again"
    shutil.copytree(
        tmp_path / "dp2" / "checkpoints" / "step_00000002", again / "checkpoints" / "step_00000002"
    )
    rest = _losses(init, str(again), ["train.micro_batch_size=2", "train.grad_accum=2"])
    assert abs(rest[1] - one[1]) < LOSS_TOL
    _close(_weights(str(tmp_path / "one")), _weights(str(again)))
