"""Pipeline parallelism for K2: the model cut into chunks, run by torch.distributed.pipelining.

`split_model` cuts a `K2ForCausalLM` into `n_chunks` sequential modules (chunk 0 embeds, the
last chunk normalises, projects and computes the loss). `build_pipeline` wraps the chunks
this rank owns (rank r owns chunks r, r + pp, r + 2 pp, ... as in Megatron's interleaving)
in `PipelineStage`s and drives them with `ScheduleInterleaved1F1B` when a rank holds several
virtual stages, `Schedule1F1B` (or `ScheduleGPipe` with fewer micro-batches than ranks)
otherwise.

What travels between chunks: the hidden states and the running sum of the MoE balance
losses (so their gradient reaches every layer through the pipe). Positions, packing
segments, labels and per-micro-batch loss weights reach every chunk as keyword inputs.
Each micro-batch's loss is already scaled to its share of the batch mean, so the sum over
micro-batches is the single-process loss of the whole batch and gradients accumulate
without the schedule rescaling them (earlier gradients in `.grad` stay untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from k2_core.errors import ConfigError
from k2_core.model import K2ForCausalLM
from k2_core.model.losses import IGNORE, linear_cross_entropy
from k2_core.model.protocols import LoadBalanced
from k2_core.precision import autocast as autocast_on
from torch import nn

BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


class PipelineChunk(nn.Module):
    """A consecutive slice of the decoder: [embedding] + layers + [final norm, head, loss].

    forward(x, aux=None, *, position_ids, segment_ids, labels, ce_weight, mb_weight) takes
    token ids (chunk 0) or hidden states [B, T, H] plus the running balance loss, and returns
    (hidden, aux) or, in the last chunk, this micro-batch's weighted loss as a [1] tensor
    (one row per micro-batch, so a forward-only schedule can concatenate them).
    """

    def __init__(
        self,
        index: int,
        n_chunks: int,
        layers: list[nn.Module],
        first_layer: int,
        rotary_emb: nn.Module,
        *,
        embed_tokens: nn.Module | None = None,
        norm: nn.Module | None = None,
        lm_head: nn.Linear | None = None,
    ):
        super().__init__()
        self.index, self.n_chunks, self.first_layer = index, n_chunks, first_layer
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary_emb  # buffers only: sharing it between chunks shares no parameter
        # Set by build_pipeline: the user's per-micro-batch loss (logits, labels) -> mean, or
        # None for the fused head + cross-entropy.
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def is_first(self) -> bool:
        """Whether this chunk embeds the tokens."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """Whether this chunk holds the final norm, the head and the loss."""
        return self.index == self.n_chunks - 1

    @property
    def layer_ids(self) -> range:
        """Indices (in the whole model) of this chunk's decoder layers."""
        return range(self.first_layer, self.first_layer + len(self.layers))

    def attention_layers(self) -> list[nn.Module]:
        """This chunk's attention modules, in order."""
        return [layer.self_attn for layer in self.layers]

    def _mask(
        self, seq: int, segment_ids: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """The same mask K2Model builds: packed segments, or explicit causal when recording."""
        if segment_ids is not None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril_()
            return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal).unsqueeze(1)
        if any(getattr(a, "record_max_logits", False) for a in self.attention_layers()):
            return torch.ones(seq, seq, dtype=torch.bool, device=device).tril_()
        return None

    def forward(
        self,
        x: torch.Tensor,
        aux: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ce_weight: torch.Tensor | None = None,
        mb_weight: torch.Tensor | None = None,
    ) -> Any:
        """Run this chunk on one micro-batch (see the class docstring).

        The loss weights make the micro-batch losses sum to the batch's: ce_weight is this
        micro-batch's share of the labelled tokens (fused CE), mb_weight its share of the rows
        (the per-sequence balance loss and a user loss_fn's mean); both default to 1.
        """
        if self.is_first:
            x = self.embed_tokens(x)
        seq = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=x.device).unsqueeze(0)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask = self._mask(seq, segment_ids, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            a = (
                getattr(layer.mlp, "aux_loss", None)
                if isinstance(layer.mlp, LoadBalanced)
                else None
            )
            if a is not None:
                aux = a.float() if aux is None else aux + a.float()
        if aux is None:  # no balance loss so far: a constant keeps the stage's outputs fixed
            aux = torch.zeros((), dtype=torch.float32, device=x.device)
        if not self.is_last:
            return x, aux
        if labels is None:
            raise ValueError("the last pipeline chunk needs `labels`")
        hidden = self.norm(x)
        one = torch.ones((), device=x.device)
        ce_weight = one if ce_weight is None else ce_weight
        mb_weight = one if mb_weight is None else mb_weight
        if self.loss_fn is None:
            ce = linear_cross_entropy(hidden, self.lm_head.weight, labels) * ce_weight
        else:
            ce = self.loss_fn(self.lm_head(hidden), labels) * mb_weight
        return (ce + aux * mb_weight).reshape(1)


def split_model(model: K2ForCausalLM, pp: int, virtual_stages: int = 1) -> list[nn.Module]:
    """Cut `model` into pp x virtual_stages sequential PipelineChunks sharing its modules (no
    copies), with the planner's layer partition (`plan.partition_layers`): the memory `k2 plan`
    counts per rank is the memory the pipeline holds."""
    from .plan import partition_layers

    n_layers, n_chunks = len(model.model.layers), pp * virtual_stages
    if not 1 <= n_chunks <= n_layers:
        raise ConfigError(
            f"parallel.options: {n_chunks} pipeline chunks (pp x virtual stages) for "
            f"{n_layers} decoder layers; use between 1 and {n_layers} chunks"
        )
    chunks = []
    for i, ids in enumerate(partition_layers(n_layers, pp, virtual_stages)[0]):
        last = i == n_chunks - 1
        chunks.append(
            PipelineChunk(
                i,
                n_chunks,
                [model.model.layers[j] for j in ids],
                ids[0],
                model.model.rotary_emb,
                embed_tokens=model.model.embed_tokens if i == 0 else None,
                norm=model.model.norm if last else None,
                lm_head=model.lm_head if last else None,
            )
        )
    return chunks


def stage_layer_ids(n_layers: int, pp: int, virtual_stages: int, pp_rank: int) -> list[int]:
    """The decoder layers pipeline rank `pp_rank` holds (every other stage's stay unallocated)."""
    from .plan import partition_layers

    return partition_layers(n_layers, pp, virtual_stages)[1][pp_rank]


def _chunk_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last chunk already computes the loss ([1]); the schedule needs it as a scalar."""
    return output.sum()


class PipelineRunner:
    """This rank's share of a pipelined K2 model and the schedule that trains it."""

    def __init__(
        self,
        model: K2ForCausalLM,
        chunks: list[PipelineChunk],
        stages: list[Any],
        schedule: Any,
        *,
        pp_group: Any,
        pp_rank: int,
        pp_size: int,
        n_microbatches: int,
        device: torch.device,
    ):
        self.model = model
        self.chunks = chunks
        self.stage_modules: list[nn.Module] = [c for c in chunks if c.index % pp_size == pp_rank]
        self.stages = stages
        self.schedule = schedule
        self.pp_group = pp_group
        self.pp_rank = pp_rank
        self.pp_size = pp_size
        self.n_microbatches = n_microbatches
        self.device = device
        self.last_rank = (len(chunks) - 1) % pp_size
        self.batch_shape: tuple[int, ...] | None = None  # fixed by the first batch (see step)

    @property
    def has_last_chunk(self) -> bool:
        """Whether this rank computes the loss."""
        return self.pp_rank == self.last_rank

    @property
    def layer_ids(self) -> list[int]:
        """The decoder layers this rank runs, in model order."""
        return sorted(i for c in self.stage_modules for i in c.layer_ids)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this rank owns and trains (each once)."""
        seen: set[int] = set()
        for chunk in self.stage_modules:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name in the whole model, parameter) for this rank's parameters."""
        mine = {id(p) for p in self.parameters()}
        return ((n, p) for n, p in self.model.named_parameters() if id(p) in mine)

    def share_batch(self, batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor | None]:
        """The batch on every pipeline rank, read by the first only: the token ids stay there;
        labels, positions and packing segments reach the others by two broadcasts."""
        if batch is not None:
            unknown = set(batch) - set(BATCH_KEYS)
            if unknown:
                raise ValueError(
                    f"pipeline batch: unexpected keys {sorted(unknown)}; expected {BATCH_KEYS}"
                )
        if self.pp_size == 1:
            return dict(batch or {})
        if self.device.type == "meta":  # a dry run hands every rank the (meta) batch: no values
            if batch is None:
                raise ValueError("pipeline on meta tensors: pass the batch on every rank")
            return {k: batch.get(k) for k in BATCH_KEYS} | {
                "input_ids": batch["input_ids"] if self.pp_rank == 0 else None
            }
        dev, first = self.device, self.pp_rank == 0
        head = torch.zeros(
            4, dtype=torch.long, device=dev
        )  # rows, seq, position rows, has segments
        if first:
            ids, pos, seg = batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids")
            head = torch.tensor(
                [
                    ids.shape[0],
                    ids.shape[1],
                    0 if pos is None else pos.shape[0],
                    int(seg is not None),
                ],
                device=dev,
            )
        dist.broadcast(head, group=self.pp_group, group_src=0)
        rows, seq, prow, has_seg = head.tolist()
        sizes = [rows, prow, rows if has_seg else 0]
        if first:
            parts = [t.to(dev).long() for t in (batch["labels"], pos, seg) if t is not None]
            flat = torch.cat(parts).contiguous()
        else:
            flat = torch.empty(sum(sizes), seq, dtype=torch.long, device=dev)
        dist.broadcast(flat, group=self.pp_group, group_src=0)
        labels, pos_t, seg_t = flat.split(sizes)
        return {
            "input_ids": batch["input_ids"] if first else None,
            "labels": labels,
            "position_ids": pos_t if prow else None,
            "segment_ids": seg_t if has_seg else None,
        }

    def _microbatches(
        self, batch: dict[str, torch.Tensor | None], loss_scale: float = 1.0
    ) -> tuple[list, list, list]:
        """Split the (shared) batch into per-micro-batch (args, kwargs, targets) on this device."""
        labels = batch["labels"].to(self.device)
        rows, n = labels.shape[0], self.n_microbatches
        # torch's stages size their receive buffers from the first micro-batch they see
        if self.batch_shape is not None and tuple(labels.shape) != self.batch_shape:
            raise ConfigError(
                f"data: pipeline batches must keep one shape; got {tuple(labels.shape)} "
                f"after {self.batch_shape} (pad to data.seq_len, fixed batch size)"
            )
        if rows % n:
            raise ConfigError(
                f"train.micro_batch_size: {rows} rows do not split into "
                f"{n} pipeline micro-batches; use a multiple of {n}"
            )
        self.batch_shape = tuple(labels.shape)
        # Each micro-batch's CE is weighted by its share of the batch's labelled tokens, so
        # the micro-batch losses sum to the mean CE over the whole batch.
        valid = (labels != IGNORE).reshape(n, -1).sum(dim=1)
        ce_weight = valid * (loss_scale / valid.sum().clamp_min(1))
        mb_weight = torch.tensor(loss_scale / n, device=self.device)  # equal-size micro-batches
        split = {"labels": labels.chunk(n)}
        for key in ("position_ids", "segment_ids"):
            t = batch.get(key)
            if t is not None:
                t = t.to(self.device)
                split[key] = t.chunk(n) if t.shape[0] == rows else [t] * n  # [1, T] broadcasts
        kwarg_mbs = []
        for i in range(n):
            kw = {k: split[k][i] for k in ("position_ids", "segment_ids") if k in split}
            kwarg_mbs.append(
                {
                    **kw,
                    "labels": split["labels"][i],
                    "ce_weight": ce_weight[i],
                    "mb_weight": mb_weight,
                }
            )
        ids = batch.get("input_ids")
        args = [(t,) for t in ids.to(self.device).chunk(n)] if ids is not None else [()] * n
        return args, kwarg_mbs, list(split["labels"])

    def step(
        self, batch: dict[str, torch.Tensor] | None, loss_scale: float = 1.0
    ) -> torch.Tensor | None:
        """Forward and backward over the batch's micro-batches; gradients accumulate in `.grad`.

        The first pipeline rank passes the batch, the others None (see `share_batch`); a
        batch passed everywhere works too. The gradients are those of `loss_scale` x the batch's
        mean loss (1 / grad_accum when several batches make one optimizer step). Returns the
        batch's mean loss (CE + balance loss, unscaled) on the rank with the last chunk, None
        elsewhere (see `broadcast_loss`).
        """
        if loss_scale <= 0:
            raise ValueError(f"loss_scale must be positive, got {loss_scale}")
        arg_mbs, kwarg_mbs, target_mbs = self._microbatches(self.share_batch(batch), loss_scale)
        losses: list[torch.Tensor] = []
        self.schedule.step(
            arg_mbs=arg_mbs,
            kwarg_mbs=kwarg_mbs,
            target_mbs=target_mbs,
            losses=losses,
            return_outputs=False,
        )
        if not self.has_last_chunk:
            return None
        return torch.stack([loss.detach().float() for loss in losses]).sum() / loss_scale

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """Forward only (no gradients): the batch's mean loss on the last chunk's rank, else None.

        Train/eval mode is the caller's (model.eval() stops MoE load counting, as usual).
        """
        arg_mbs, kwarg_mbs, target_mbs = self._microbatches(self.share_batch(batch))
        out = self.schedule.eval(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=target_mbs)
        return out.float().sum() if self.has_last_chunk else None

    def broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last chunk's loss on every rank of the pipeline group."""
        t = (
            loss.detach().float().clone()
            if loss is not None
            else torch.zeros((), device=self.device)
        )
        t = t.to(self.device)
        dist.broadcast(t, group=self.pp_group, group_src=self.last_rank)
        return t

    def max_logits(self) -> torch.Tensor:
        """[layers, heads] max pre-softmax logits of the whole model, max-reduced over the group.

        Each rank records its own layers (model.set_record_max_logits / reset_max_logits act
        on every layer as usual); layers on other ranks arrive through the reduction.
        """
        attn = self.model.attention_layers()
        heads = attn[0].num_heads
        local = torch.full((len(attn), heads), float("-inf"), device=self.device)
        for i in self.layer_ids:
            if getattr(attn[i], "max_logits", None) is None:
                raise RuntimeError(
                    f"layer {i}: no max logits recorded; call "
                    "set_record_max_logits(True) and run a step"
                )
            local[i] = attn[i].max_logits.to(self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.pp_group)
        return local


def _forward_context(chunk: PipelineChunk, autocast: torch.dtype | None) -> Callable[..., Any]:
    """Around every stage forward: autocast, and no trace of torch's metadata probe.

    The dynamic shape probe runs the chunk once on placeholder tensors; the running max
    logits it would leave behind are put back.
    """

    @contextmanager
    def ctx(info: Any) -> Iterator[None]:
        with ExitStack() as stack:
            if autocast is not None:
                stack.enter_context(autocast_on(chunk_device(chunk).type, autocast))
            if not info.is_metadata_inference:
                yield
                return
            attn = chunk.attention_layers()
            saved = [getattr(a, "max_logits", None) for a in attn]
            try:
                yield
            finally:
                for a, m in zip(attn, saved, strict=True):
                    a.max_logits = m

    return ctx


def chunk_device(chunk: nn.Module) -> torch.device:
    """The device of a chunk's first parameter or buffer."""
    for t in chunk.parameters():
        return t.device
    for t in chunk.buffers():
        return t.device
    return torch.device("cpu")


def stage_io(
    chunk: PipelineChunk, rows: int, seq: int, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Example (inputs, outputs) of a chunk for one micro-batch of `rows` x `seq` tokens, on
    the meta device: token ids or (hidden, balance loss) in; (hidden, balance loss) or the
    [1] loss out. Hidden states keep the parameters' dtype (autocast leaves the residual)."""
    hidden = (
        next(p.dtype for p in chunk.layers.parameters()) if len(chunk.layers) else torch.float32
    )
    meta = torch.device("meta")
    # requires_grad marks what carries a gradient back between stages (static mode reads it)
    h = torch.empty(
        rows, seq, chunk.rotary_emb.cfg.hidden_size, dtype=hidden, device=meta, requires_grad=True
    )
    aux = torch.empty((), dtype=torch.float32, device=meta, requires_grad=True)
    ins = (torch.empty(rows, seq, dtype=torch.long, device=meta),) if chunk.is_first else (h, aux)
    outs = (torch.empty(1, device=meta, requires_grad=True),) if chunk.is_last else (h, aux)
    return ins, outs


def build_pipeline(
    model: K2ForCausalLM,
    *,
    pp_group: Any,
    pp_rank: int,
    pp_size: int,
    virtual_stages: int,
    n_microbatches: int,
    device: torch.device | str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    micro_batch: tuple[int, int] | None = None,
) -> PipelineRunner:
    """Split `model` into pp_size x virtual_stages chunks and schedule this rank's share.

    loss_fn(logits, labels) -> mean loss of one micro-batch replaces the fused head + CE
    (the balance loss is added either way); autocast runs each stage's forward in that dtype.
    `micro_batch` = (rows, seq_len) of every batch gives the stages their shapes statically
    (no dynamic shape inference, so the pipeline also runs on meta tensors).
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConfigError(f"parallel.options: pipeline rank {pp_rank} of {pp_size} is out of range")
    if virtual_stages < 1:
        raise ConfigError("parallel.options.virtual_stages: must be at least 1")
    if n_microbatches < 1:
        raise ConfigError("parallel.options.n_microbatches: must be at least 1")
    if model.config.tie_word_embeddings and pp_size > 1:
        raise ConfigError(
            "model.tie_word_embeddings: a tied head spans the first and last "
            "pipeline ranks; untie it (K2 is untied) or use pp=1"
        )
    rounds = max(1, n_microbatches // pp_size)
    if virtual_stages > 1 and n_microbatches % rounds:
        raise ConfigError(
            f"parallel.options.n_microbatches: interleaved 1F1B needs a multiple of "
            f"{rounds} micro-batches (got {n_microbatches}); use a multiple of {pp_size}"
        )
    device = torch.device(device)
    n_chunks = pp_size * virtual_stages
    chunks = split_model(model, pp_size, virtual_stages)
    if micro_batch is not None and micro_batch[0] % n_microbatches:
        raise ConfigError(
            f"train.micro_batch_size: {micro_batch[0]} rows do not split into "
            f"{n_microbatches} pipeline micro-batches; use a multiple of {n_microbatches}"
        )
    stages = []
    for chunk in chunks[pp_rank::pp_size]:
        chunk.loss_fn = loss_fn
        static = {}
        if micro_batch is not None:  # shapes given: no shape-inference forward at the first step
            rows = micro_batch[0] // n_microbatches
            static = dict(
                zip(
                    ("input_args", "output_args"),
                    stage_io(chunk, rows, micro_batch[1], device),
                    strict=True,
                )
            )
        stage = PipelineStage(chunk, chunk.index, n_chunks, device, group=pp_group, **static)
        stage.register_forward_context(_forward_context(chunk, autocast))
        stages.append(stage)
    # The chunks' losses are already scaled to the batch mean: no rescaling of gradients.
    if virtual_stages > 1:
        schedule = ScheduleInterleaved1F1B(
            stages, n_microbatches, loss_fn=_chunk_loss, scale_grads=False
        )
    elif n_microbatches >= pp_size:
        schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=_chunk_loss, scale_grads=False)
    else:
        schedule = ScheduleGPipe(stages[0], n_microbatches, loss_fn=_chunk_loss, scale_grads=False)
    return PipelineRunner(
        model,
        chunks,
        stages,
        schedule,
        pp_group=pp_group,
        pp_rank=pp_rank,
        pp_size=pp_size,
        n_microbatches=n_microbatches,
        device=device,
    )
