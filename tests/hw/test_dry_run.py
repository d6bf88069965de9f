"""`k2 plan --dry-run`: sampled ranks built on meta tensors over torch's fake process group hold
what the planner says (issue 14 item 8); the private torch API it stands on is pinned here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from k2_core.cli import main
from k2_hw_h800.dryrun import fake_backend_name, fake_store, global_rank, sampled_ranks

KEYS = ("param_bytes", "grad_bytes", "optim_bytes", "checkpoint_bytes")


def test_fake_process_group_api_the_dry_run_needs():
    """A torch upgrade that moves FakeStore, drops the per-device fake backend or changes the
    pipeline schedules' "fake" check fails here, loudly, instead of in `k2 plan --dry-run`."""
    import inspect

    from torch.distributed.pipelining import schedules

    dist.init_process_group("cpu:fake,meta:fake", store=fake_store(), rank=3, world_size=8)
    try:
        t = torch.empty(4, device="meta")
        ops = [dist.P2POp(dist.isend, t, 2), dist.P2POp(dist.irecv, t, 4)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()  # batched p2p on meta tensors: needs "meta:fake"
        dist.all_reduce(t)
        echo: list = [None] * 8
        dist.all_gather_object(echo, ("me", 3))
        assert echo == [("me", 3)] * 8  # the fake group echoes this rank's object
        with fake_backend_name():
            assert dist.get_backend() == "fake"
        assert dist.get_backend() == "cpu:fake,meta:fake"
    finally:
        dist.destroy_process_group()
    assert 'backend == "fake"' in inspect.getsource(
        schedules
    ) or 'backend != "fake"' in inspect.getsource(schedules)


def test_sampled_ranks_cover_first_middle_last_stage():
    cells = sampled_ranks(16, 8, 16)
    assert {c[0] for c in cells} == {0, 8, 15} and len(cells) == 6
    assert global_rank(15, 7, 15, 8, 16) == 2047 and global_rank(0, 0, 0, 8, 16) == 0


def _dry(args: list[str], capsys) -> dict:
    rc = main(["plan", *args, "--dry-run", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert rc == (0 if report["ok"] else 1)
    return report


def _check(report: dict, pps: set[int]) -> None:
    assert report["ok"] and {r["pp_rank"] for r in report["ranks"]} == pps
    for r in report["ranks"]:
        for k in KEYS:
            assert r[k] > 0 and abs(r[k] - r["planned"][k]) <= 0.05 * r["planned"][k], (
                r["rank"],
                k,
            )


@pytest.mark.distributed
def test_dry_run_small_on_one_node(capsys):
    report = _dry(["--model", "small", "--nodes", "1"], capsys)
    _check(report, {0})
    assert len(report["ranks"]) == 2 and report["plan"]["parallel"]["dp"] == 8


@pytest.mark.slow
@pytest.mark.distributed
def test_dry_run_k2_1t_on_256_nodes(capsys):
    """The report's job: 2,048 ranks at PP16 x EP16 x DP8, 6 sampled, every figure within 5%
    of the plan (the acceptance check dry-run-k2-1t also bounds its RSS)."""
    report = _dry(["--model", "k2-1t", "--nodes", "256"], capsys)
    _check(report, {0, 8, 15})
    assert report["layout"] == {
        "pp": 16,
        "ep": 16,
        "dp": 8,
        "virtual_stages": report["layout"]["virtual_stages"],
    }
    assert {r["rank"] for r in report["ranks"]} >= {0, 2047}
