"""Balanced ZeRO-1 over two groups (gloo, 4 ranks as dp2 x ep2): dense state split by rows over
all 4 ranks, expert shards' state over their 2 dp replicas. A few steps equal single-process
MuonClip, per-rank optimizer bytes stay within 10% of the mean although the embedding's AdamW
state alone exceeds it, and state dicts round-trip (shard, consolidated, full)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from k2_optim import DistributedMuonClip, MuonClip
from optim_helpers import PlainAttention
from torch import nn

STEPS, BATCH, SEQ, VOCAB, DIM, EXPERTS = 3, 8, 12, 512, 32, 8
DP, EP = 2, 2


class MoELM(nn.Module):
    """A big embedding and head (AdamW), one attention layer, a 3-D expert stack (muon_split=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.attn = PlainAttention(DIM, 4)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * 16, DIM) * 0.1)
        self.gate_up.muon_split = 2
        self.down = nn.Parameter(torch.randn(EXPERTS, DIM, 16) * 0.1)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        x = x + self.attn(x)
        h = torch.einsum("btd,efd->btef", x, self.gate_up)
        g, u = h.chunk(2, dim=-1)
        x = x + torch.einsum("btef,edf->btd", torch.nn.functional.silu(g) * u, self.down) / EXPERTS
        return self.lm_head(self.norm(x))


def _model() -> MoELM:
    torch.manual_seed(0)
    m = MoELM()
    with torch.no_grad():
        m.attn.q_proj.weight.mul_(torch.linspace(1, 30, DIM).unsqueeze(1))  # some heads clip
    return m


def _groups(model: MoELM, experts: list[nn.Parameter]) -> list[dict]:
    """Muon / AdamW / no-decay groups, with `experts` standing in for the expert stacks."""
    a = model.attn
    mats = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, *experts]
    return [
        {"params": mats, "use_muon": True},
        {"params": [model.embed_tokens.weight, model.lm_head.weight], "use_muon": False},
        {
            "params": [
                a.q_proj.bias,
                a.v_proj.bias,
                a.o_proj.bias,
                model.norm.weight,
                model.norm.bias,
            ],
            "use_muon": False,
            "weight_decay": 0.0,
        },
    ]


def _targets(model: MoELM):
    from k2_optim import QKClipTarget

    a = model.attn
    return [
        QKClipTarget(
            max_logits=a,
            q_weight=a.q_proj.weight,
            k_weight=a.k_proj.weight,
            heads=a.heads,
            q_bias=a.q_proj.bias,
            name="attn",
        )
    ]


KW = dict(lr=0.02, weight_decay=0.1, adamw_lr=1e-2, qk_clip_tau=3.0, ns_dtype=torch.float32)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _loss(model, ids):
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def _worker(rank, port, reduce_grads, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DP * EP
    )
    torch.set_num_threads(1)
    try:
        dp_rank, ep_rank = divmod(rank, EP)  # data rank = dp_rank * ep + ep_rank
        dp_groups = [dist.new_group([d * EP + e for d in range(DP)]) for e in range(EP)]
        ep_groups = [dist.new_group([d * EP + e for e in range(EP)]) for d in range(DP)]
        dp_group, ep_group = dp_groups[ep_rank], ep_groups[dp_rank]
        model = _model()
        local = EXPERTS // EP
        lo = ep_rank * local
        full = [model.gate_up, model.down]
        shards = []
        for t in full:  # this EP rank's experts, as expert parallelism would hold them
            s = nn.Parameter(t.detach()[lo : lo + local].clone())
            s.__dict__.update(t.__dict__)
            s._k2_ep_sharded = True
            shards.append(s)
        # the reduce_grads run also takes tiny buckets: many Newton-Schulz buckets (experts
        # cut apart) and many all-gather rounds per step
        opt = DistributedMuonClip(
            _groups(model, shards),
            qk_clip_targets=_targets(model),
            process_group=None,
            expert_group=dp_group,
            reduce_grads=reduce_grads,
            bucket_bytes=4096 if reduce_grads else 64 << 20,
            **KW,
        )
        per = BATCH // (DP * EP)
        clipped = []
        for ids in _batches():
            opt.zero_grad()
            for t in full:
                t.grad = None
            if reduce_grads:
                # each rank its quarter of the batch; an expert shard's gradient sums every EP
                # rank's tokens (what the all-to-all backward gives), the optimizer the rest
                _loss(model, ids[rank * per : (rank + 1) * per]).backward()
                for t in full:
                    dist.all_reduce(t.grad, group=ep_group)
            else:
                _loss(model, ids).backward()  # already the global-batch gradient
            for t, s in zip(full, shards, strict=True):
                s.grad = t.grad[lo : lo + local].clone()
            opt.step()
            clipped.append(int(opt.last_clip_stats["heads_clipped"]))
            with torch.no_grad():  # the next forward needs every expert
                for t, s in zip(full, shards, strict=True):
                    parts = [torch.empty_like(s) for _ in range(EP)]
                    dist.all_gather(parts, s.detach(), group=ep_group)
                    t.copy_(torch.cat(parts))
        every = [None] * (DP * EP)
        dist.all_gather_object(every, opt.state_bytes())
        shard = opt.state_dict()
        full_sd = opt.consolidated_state_dict()
        # a fresh optimizer of the same layout loads the full dict and the shard alike
        again = []
        for sd in (full_sd, shard):
            o2 = DistributedMuonClip(
                _groups(model, shards), qk_clip_targets=_targets(model), expert_group=dp_group, **KW
            )
            o2.load_state_dict(sd)
            again.append(o2.state_dict())
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "clipped": clipped,
                "bytes": every,
                "planned": opt.plan.loads,
                "shard": shard,
                "full": full_sd,
                "again": again,
                "lo": lo,
                "embed_rows": opt.owned_rows(model.embed_tokens.weight),
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_state_close(got: dict, want: dict, tol: dict) -> None:
    for k, v in want.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(got[k], v, **tol)
        else:
            assert got[k] == v


@pytest.mark.distributed
@pytest.mark.parametrize("reduce_grads", [False, True])
def test_two_group_zero1_equals_single_process(tmp_path, reduce_grads):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), reduce_grads, out), nprocs=DP * EP, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=False) for r in range(DP * EP)]

    model = _model()
    opt = MuonClip(
        _groups(model, [model.gate_up, model.down]), qk_clip_targets=_targets(model), **KW
    )
    clipped = []
    for ids in _batches():
        opt.zero_grad()
        _loss(model, ids).backward()
        opt.step()
        clipped.append(int(opt.last_clip_stats["heads_clipped"]))
    tol = dict(atol=1e-5, rtol=1e-5)
    for g in got:
        assert g["clipped"] == clipped and sum(clipped) > 0
        for n, p in model.named_parameters():
            torch.testing.assert_close(g["params"][n], p.detach(), **tol, msg=n)

    # balance: measured bytes are the plan's, within 10% of the mean, although the
    # embedding's state alone is more than the mean (so it had to be split by rows)
    measured = got[0]["bytes"]
    assert measured == got[0]["planned"]
    mean = sum(measured) / len(measured)
    assert max(measured) <= 1.1 * mean
    assert VOCAB * DIM * 4 * 2 > mean
    assert sum(g["embed_rows"] is not None for g in got) > 1

    # the consolidated dict is the single-process one (experts: the local EP slice)
    ref = opt.state_dict()["state"]
    n_mats = 4
    for g in got:
        full = g["full"]["state"]
        assert set(full) == set(ref)
        for pid, st in ref.items():
            want = st
            if pid in (n_mats, n_mats + 1):  # the expert stacks
                want = {
                    k: (v[g["lo"] : g["lo"] + EXPERTS // EP] if torch.is_tensor(v) else v)
                    for k, v in st.items()
                }
            _assert_state_close(full[pid], want, tol)
        # loading the full dict or the shard gives back exactly the shard
        for sd in g["again"]:
            assert sd["owned_rows"] == g["shard"]["owned_rows"]
            assert set(sd["state"]) == set(g["shard"]["state"])
            for pid, st in g["shard"]["state"].items():
                _assert_state_close(sd["state"][pid], st, dict(atol=0, rtol=0))
