"""Pipeline parallelism (k2_hw_h800.pipeline): chunks compose to the model; PP2 and PP2 with
two virtual stages per rank (interleaved 1F1B) over gloo match the single-process loss,
gradients and max logits, and track its losses over a few AdamW steps. Routing is tie-free by
construction and checked (backend_runs.fix_routing, RoutingMargin)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.pipelining  # noqa: F401  (imported once here; forked workers share it)
import torch.multiprocessing as mp
from backend_runs import RoutingMargin, fix_routing, worst_loss_gap
from k2_core.config import ModelConfig, MoEConfig
from k2_core.errors import ConfigError
from k2_core.model import build_model
from k2_hw_h800.pipeline import build_pipeline, split_model

VOCAB, SEQ, ROWS, N_MB, STEPS, LR = 128, 32, 8, 4, 4, 3e-3


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    moe = MoEConfig(
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        seq_aux_loss_coef=0.01,
    )
    model = build_model((cfg, moe))
    fix_routing(model)  # tie-free routing: layouts may differ by float order only
    return model.train()


def _batches(packed: bool) -> list[dict[str, torch.Tensor]]:
    """Random batches; labels partly ignored (unevenly per micro-batch); optionally packed."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = (3 * ids + 1) % VOCAB  # learnable, so a few steps lower the loss
        labels[0, :20] = -100
        labels[5, 3:9] = -100
        b = {"input_ids": ids, "labels": labels}
        if packed:
            cut = torch.randint(4, SEQ - 4, (ROWS, 1), generator=g)
            pos = torch.arange(SEQ).expand(ROWS, SEQ)
            b["segment_ids"] = (pos >= cut).long()
            b["position_ids"] = torch.where(pos >= cut, pos - cut, pos)
        out.append(b)
    return out


def _reference(packed: bool) -> dict:
    """Single process, whole batch: loss, gradients and max logits of step 1, then the losses."""
    model = _model()
    model.set_record_max_logits(True)
    margin = RoutingMargin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first = [], {}
    for step, batch in enumerate(_batches(packed)):
        model.reset_max_logits()
        loss = model(**batch, return_logits=True).loss
        loss.backward()
        if step == 0:
            first = {
                "loss": loss.detach().clone(),
                "max_logits": model.max_logits().clone(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        losses.append(float(loss.detach()))
        opt.step()
        model.update_router_bias()
        opt.zero_grad()
    margin.check("single")
    return {**first, "losses": losses}


def _worker(rank, world, port, virtual, packed, out):
    # a bounded timeout: a failing rank must not leave its peer waiting for half an hour
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        model = _model()
        model.set_record_max_logits(True)
        margin = RoutingMargin(model)
        runner = build_pipeline(
            model,
            pp_group=dist.group.WORLD,
            pp_rank=rank,
            pp_size=world,
            virtual_stages=virtual,
            n_microbatches=N_MB,
            device="cpu",
        )
        opt = torch.optim.AdamW(runner.parameters(), lr=LR)
        losses, first = [], {}
        model.eval()
        eval_loss = runner.broadcast_loss(runner.eval_step(_batches(packed)[0]))
        model.train()
        for step, batch in enumerate(_batches(packed)):
            model.reset_max_logits()
            if step == 0 and virtual == 2:  # two half-weighted passes accumulate one full step
                half = runner.step(batch, loss_scale=0.5)
                loss = runner.step(batch, loss_scale=0.5)
                assert half is None or torch.equal(half, loss)
            else:
                loss = runner.step(batch)
            assert (loss is None) != runner.has_last_chunk
            if step == 0:
                first = {
                    "loss": loss,
                    "max_logits": runner.max_logits(),
                    "grads": {n: p.grad.clone() for n, p in runner.named_parameters()},
                    "chunks": [c.index for c in runner.stage_modules],
                    "layers": runner.layer_ids,
                    "eval_loss": eval_loss,
                }
            losses.append(float(runner.broadcast_loss(loss)))
            opt.step()
            model.update_router_bias()
            opt.zero_grad()
        margin.check(f"pipeline rank {rank}")
        if virtual == 1:  # a fresh model, one step with the stages' forwards under bf16 autocast
            bf16 = build_pipeline(
                _model(),
                pp_group=dist.group.WORLD,
                pp_rank=rank,
                pp_size=world,
                virtual_stages=1,
                n_microbatches=N_MB,
                device="cpu",
                autocast=torch.bfloat16,
            )
            first["bf16_loss"] = bf16.broadcast_loss(bf16.step(_batches(packed)[0]))
        torch.save({**first, "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chunks_compose_to_the_model():
    model = _model()
    batch = _batches(packed=True)[0]
    ref = model(**batch, return_logits=True).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunks = split_model(model, 3)
    assert [len(c.layers) for c in chunks] == [1, 2, 1]  # the planner's: spare layers off the ends
    assert (
        chunks[0].embed_tokens is model.model.embed_tokens and chunks[-1].lm_head is model.lm_head
    )
    assert all(c.rotary_emb is model.model.rotary_emb for c in chunks)
    kw = {k: batch[k] for k in ("position_ids", "segment_ids")}
    x = chunks[0](batch["input_ids"], **kw)
    x = chunks[1](*x, **kw)
    loss = chunks[2](*x, labels=batch["labels"], **kw).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_split_and_build_reject_bad_layouts():
    model = _model()
    with pytest.raises(ConfigError, match="4 decoder layers"):
        split_model(model, 5)
    with pytest.raises(ConfigError, match="virtual_stages"):
        build_pipeline(
            model,
            pp_group=None,
            pp_rank=0,
            pp_size=2,
            virtual_stages=0,
            n_microbatches=4,
            device="cpu",
        )
    with pytest.raises(ConfigError, match="n_microbatches"):
        build_pipeline(
            model,
            pp_group=None,
            pp_rank=0,
            pp_size=2,
            virtual_stages=2,
            n_microbatches=5,
            device="cpu",
        )


@pytest.mark.distributed
@pytest.mark.parametrize("virtual,packed", [(1, False), (2, True)], ids=["pp2", "pp2x2v"])
def test_pipeline_matches_single_process(tmp_path, virtual, packed):
    world = 2
    # fork, not spawn: workers inherit the imports (torch's pipelining alone takes seconds)
    mp.start_processes(
        _worker,
        args=(world, _free_port(), virtual, packed, str(tmp_path)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    ref = _reference(packed)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    n_chunks = world * virtual
    assert [r["chunks"] for r in ranks] == [list(range(k, n_chunks, world)) for k in range(world)]
    assert sorted(i for r in ranks for i in r["layers"]) == [0, 1, 2, 3]
    last = ranks[(n_chunks - 1) % world]
    torch.testing.assert_close(last["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
    grads = {n: g for r in ranks for n, g in r["grads"].items()}
    assert set(grads) == set(ref["grads"])
    for n, g in grads.items():
        torch.testing.assert_close(g, ref["grads"][n], rtol=1e-5, atol=1e-5, msg=n)
    for r in ranks:
        torch.testing.assert_close(r["eval_loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["max_logits"], ref["max_logits"], rtol=1e-5, atol=1e-5)
        assert r["losses"] == last["losses"]
    # 4 AdamW steps from identical weights, tie-free routing: the losses (~5) differ by float
    # order only, a few ulps a step (measured 1e-6); 1e-5 as for the first step's
    assert worst_loss_gap(last["losses"], ref["losses"], f"pipeline v{virtual}") < 1e-5, (
        last["losses"],
        ref["losses"],
    )
    assert ref["losses"][-1] < ref["losses"][0]
    if virtual == 1:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = _model()(**_batches(packed)[0], return_logits=True).loss.float()
        for r in ranks:
            assert r["bf16_loss"].dtype == torch.float32
            torch.testing.assert_close(r["bf16_loss"], ref_bf16.detach(), rtol=0, atol=2e-2)
            assert (r["bf16_loss"] - ref["loss"]).abs() > 0  # autocast really changed the math
