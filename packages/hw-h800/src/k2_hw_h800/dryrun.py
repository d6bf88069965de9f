"""`k2 plan --dry-run`: sampled ranks of a plan built and stepped on meta tensors.

One process joins torch's fake process group at the plan's full world size (for the cpu and
the meta device: pipelining's batched p2p runs on meta tensors) once per sampled rank, and
builds that rank's run through the same code path as a real job (`build_run` with the `h800`
backend on the meta device): deferred initialisation, expert sharding, pipeline stage, BF16
weights with FP32 gradient buffers, ZeRO-1. It runs one training step on a synthetic meta batch
(static stage shapes, uniform all-to-all splits) and counts what a checkpoint save would write
(`CountingWriter`). Per rank it reports the bytes of parameters, gradients, optimizer state
(master weights included) and checkpoint writes measured from the tensors the rank holds,
beside the planner's figures. No tracker, no corpus, no disk writes.

The fake process group echoes each rank's own data in every collective: where ranks exchange
sizes (ZeRO-1's expert-group shapes, the checkpoint writers' loads) every other rank is taken
to look like this one, which the layout's symmetry makes true up to the balance of row splits.
The activation policy is left out (it changes activations, which a meta step does not hold).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

#: allowed relative deviation from the plan per figure (item 4: optimizer state within 10%)
TOLERANCE = {"param_bytes": 0.05, "grad_bytes": 0.05, "optim_bytes": 0.10, "checkpoint_bytes": 0.05}


def fake_store() -> Any:
    """torch's FakeStore (private API, pinned by tests/hw/test_dry_run.py); importing its
    module registers the `fake` process-group backend."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


@contextmanager
def fake_backend_name() -> Iterator[None]:
    """`dist.get_backend` answers "fake" for the fake group while this runs: torch's pipeline
    schedules skip their cross-rank set-up (a vote read with `.item()`) only for a backend
    named exactly "fake", while batched p2p on meta tensors needs the group registered for the
    meta device ("cpu:fake,meta:fake")."""
    real = dist.get_backend

    def get_backend(group: Any = None) -> Any:
        name = real(group)
        return "fake" if "fake" in str(name) else name

    dist.get_backend = get_backend
    try:
        yield
    finally:
        dist.get_backend = real


def sampled_ranks(pp: int, dp: int, ep: int) -> list[tuple[int, int, int]]:
    """(pp_rank, dp_rank, ep_rank) sampled: the first, a middle and the last pipeline rank,
    each at the first data rank and at the last (dp - 1, ep - 1) when there are several."""
    stages = sorted({0, pp // 2, pp - 1})
    cells = [(0, 0)] + ([(dp - 1, ep - 1)] if dp * ep > 1 else [])
    return [(s, d, e) for s in stages for d, e in cells]


def global_rank(pp_rank: int, dp_rank: int, ep_rank: int, dp: int, ep: int) -> int:
    """The rank of a (pp, dp, ep) mesh cell (the mesh is row-major over pp, dp, ep)."""
    return (pp_rank * dp + dp_rank) * ep + ep_rank


def _overrides(plan: Any) -> list[str]:
    c = plan.best
    rows = c.pp  # one sequence per pipeline micro-batch, pp of them: every schedule's minimum
    return [
        "parallel.backend=h800",
        f"parallel.options.pp={c.pp}",
        f"parallel.options.ep={c.ep}",
        f"parallel.options.dp={c.dp}",
        f"parallel.options.virtual_stages={c.v}",
        f"parallel.options.n_microbatches={rows}",
        "parallel.options.device=meta",
        "parallel.options.dtype=bf16",
        f"train.micro_batch_size={rows}",
        "train.grad_accum=1",
        "train.eval_every=0",
        "tracking.tracker=null",
        "checkpoint.resume=never",
        f"data.seq_len={plan.options.seq_len}",
    ]


def _nbytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure_rank(model_name: str, plan: Any, rank: int) -> dict[str, int]:
    """Build `rank` of the plan on meta tensors, run one step and a counted checkpoint save;
    the bytes it holds and writes."""
    from k2_core.checkpoint import CountingWriter
    from k2_core.configio import load_config
    from k2_core.orchestrator import build_run
    from k2_core.precision import grad_of
    from k2_core.trainstate import rank_share

    c = plan.best
    dist.init_process_group(
        "cpu:fake,meta:fake", store=fake_store(), rank=rank, world_size=c.pp * c.dp * c.ep
    )
    try:
        with fake_backend_name():
            cfg = load_config(model_name, _overrides(plan))
            run = build_run(cfg, dry_run=True)
            model, opt, backend = run.model, run.optimizer, run.backend
            rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len
            ids = torch.empty(rows, seq, dtype=torch.long, device="meta")
            model.train()
            model.set_record_max_logits(True)
            model.reset_max_logits()
            backend.train_step(run, iter([{"input_ids": ids, "labels": ids}]))
            # the loop's update without its one host read (the finite check: no values on meta)
            opt.step()
            run.scheduler.step()
            model.update_router_bias()
            held = [p for p in model.parameters() if p.requires_grad]
            writer = CountingWriter(rank)
            for h in rank_share(model, opt, backend.checkpoint_sharding(model, opt)):
                writer.write(h.group, h.name, h.shape, h.tensor.dtype, h.start, h.tensor)
            state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
            out = {
                "param_bytes": _nbytes(held),
                "grad_bytes": _nbytes(g for g in map(grad_of, held) if g is not None),
                "optim_bytes": _nbytes(state),
                "checkpoint_bytes": writer.bytes_written,
                "pp_rank": backend.layout.pp_rank,
                "dp_rank": backend.layout.dp_rank,
                "ep_rank": backend.layout.ep_rank,
            }
            opt.zero_grad(set_to_none=True)
            del run, model, opt, backend
            return out
    finally:
        dist.destroy_process_group()
        gc.collect()


def dry_run(model_name: str, plan: Any) -> dict[str, Any]:
    """Measure the sampled ranks of `plan` against its per-GPU figures; {"ranks", "ok", ...}."""
    c = plan.best
    ranks = []
    for pp_rank, dp_rank, ep_rank in sampled_ranks(c.pp, c.dp, c.ep):
        r = global_rank(pp_rank, dp_rank, ep_rank, c.dp, c.ep)
        got = measure_rank(model_name, plan, r)
        st = c.states[pp_rank]
        planned = {
            "param_bytes": int(st.bf16_params),
            "grad_bytes": int(st.fp32_grads),
            "optim_bytes": int(st.optimizer),
            "checkpoint_bytes": int(st.checkpoint),
        }
        dev = {k: abs(got[k] - v) / max(v, 1) for k, v in planned.items()}
        ranks.append(
            {
                "rank": r,
                **got,
                "planned": planned,
                "deviation": {k: round(v, 4) for k, v in dev.items()},
                "ok": all(dev[k] <= TOLERANCE[k] for k in dev),
            }
        )
    return {
        "model": plan.model_name,
        "world_size": c.pp * c.dp * c.ep,
        "layout": {"pp": c.pp, "ep": c.ep, "dp": c.dp, "virtual_stages": c.v},
        "tolerance": TOLERANCE,
        "ranks": ranks,
        "ok": all(r["ok"] for r in ranks),
    }


def dry_run_table(report: dict[str, Any]) -> str:
    """The dry run as a table: measured vs planned GB per sampled rank."""
    keys = ("param_bytes", "grad_bytes", "optim_bytes", "checkpoint_bytes")
    lay = report["layout"]
    lines = [
        f"dry run of {report['model']} at world size {report['world_size']} "
        f"(PP{lay['pp']} x EP{lay['ep']} x DP{lay['dp']}, meta tensors, fake process group)",
        f"{'rank':>6} {'pp':>3} {'dp':>3} {'ep':>3}  "
        + "  ".join(f"{k.removesuffix('_bytes') + ' GB':>18}" for k in keys)
        + "  worst",
        f"{'':>18}  " + "  ".join(f"{'measured/planned':>18}" for _ in keys),
    ]
    for r in report["ranks"]:
        cells = "  ".join(f"{r[k] / 1e9:8.2f}/{r['planned'][k] / 1e9:<9.2f}" for k in keys)
        worst = max(r["deviation"].values())
        lines.append(
            f"{r['rank']:>6} {r['pp_rank']:>3} {r['dp_rank']:>3} {r['ep_rank']:>3}  "
            f"{cells}  {worst:.1%}{'' if r['ok'] else '  OVER'}"
        )
    lines.append(
        "all sampled ranks within the plan"
        if report["ok"]
        else "some sampled rank differs from the plan by more than the tolerance"
    )
    return "\n".join(lines)
