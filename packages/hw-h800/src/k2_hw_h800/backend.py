"""The `h800` backend: one process per device, a (pp, dp, ep) mesh, expert parallelism, ZeRO-1
(k2's own, or inside DeepSpeed with engine=deepspeed), global-load router updates, fail-fast
collectives and layout-free checkpoints.

It implements k2_core's backend contract (`k2_core.backend.Backend`): `parallelize(model, seed)`
takes the model on the meta device, shards the experts, and materialises on this rank's
device only what the rank trains (its pipeline stage's layers, its experts; other stages'
parameters stay on meta, frozen, never allocated), initialised layout-free;
`wrap_optimizer` (ZeRO-1), `train_step`, `evaluate`, `save_train_state` / `load_train_state`.
Only the first pipeline stage reads the dataset. Checkpoints are layout-free
(`k2_core.trainstate`): every rank writes only its share (`checkpointing.LayoutSharding`) and
reads only the rows it holds, so a run saved under one layout resumes under any other (or in
one process), ZeRO-1 optimizer state included.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from k2_core.backend import Backend
from k2_core.checkpoint import chunk_rows
from k2_core.errors import ConfigError, K2Error
from k2_core.model.init import global_rows, materialize
from k2_core.precision import autocast, use_low_precision_weights
from torch import nn

from .expert_parallel import EP_ATTR, moe_layers
from .mesh import Layout, build_layout, init_process_group, resolve_device
from .options import H800Options, resolve_dtype
from .parallelize import parallelize
from .zero import (
    check_deepspeed_layout,
    clip_global_grad_norm,
    make_deepspeed_optimizer,
    make_zero1_optimizer,
    reduce_gradients,
)


class DistributedError(K2Error):
    """A collective failed: a peer rank died, hung past the timeout, or the job is misconfigured."""

    kind = "distributed"


def _collective_error(
    rank: int, what: str, timeout_s: float, exc: BaseException
) -> DistributedError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return DistributedError(
        f"rank {rank}: {what} failed: a peer rank died or did not answer within "
        f"parallel.options.timeout_s={timeout_s:g}s ({type(exc).__name__}: {first}); "
        "restart the job: it resumes from the last checkpoint"
    )


_COMM_WORDS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "peer",
    "socket",
    "broken pipe",
)


def _is_comm_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from a collective (a lost or hung peer), not from a bug elsewhere."""
    return isinstance(exc, dist.DistError) or any(w in str(exc).lower() for w in _COMM_WORDS)


def _guarded_step(self: Any, closure: Any = None) -> Any:
    """optimizer.step() whose collective failures become a one-line DistributedError."""
    try:
        return type(self).step(self, closure)
    except RuntimeError as exc:
        if not _is_comm_failure(exc):
            raise
        raise _collective_error(
            dist.get_rank(), "the optimizer step", self._k2_timeout_s, exc
        ) from None


class H800Backend(Backend):
    """The `backend` slot's `h800`: see the module doc."""

    def __init__(self, options: H800Options):
        self.options = options
        if options.engine == "deepspeed":
            check_deepspeed_layout(options)
        self.device = resolve_device(options)
        init_process_group(options, self.device)
        self.layout: Layout = build_layout(options, self.device)
        self.dtype = resolve_dtype(options, self.layout.dp)  # "bf16" or "fp32"
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._param_index: list[nn.Parameter] = []
        self._model: nn.Module | None = None
        self._runner: Any = None  # the pipeline (pp > 1), built at the first step

    @property
    def data_rank(self) -> int:
        """Ranks of one stage read different shards; the pipeline's stages share one."""
        return self.layout.data_rank

    @property
    def data_world_size(self) -> int:
        """dp x ep shards."""
        return self.layout.data_size

    @property
    def reads_data(self) -> bool:
        """Only the first pipeline stage reads batches; the others receive what they need."""
        return self.layout.pp_rank == 0

    def _bf16(self, train: Any) -> bool:
        return bool(train.bf16) or self.dtype == "bf16"

    def _pipeline(self, run: Any) -> Any:
        """This rank's pipeline stages (built once the run's precision is known)."""
        if self._runner is None:
            from .pipeline import build_pipeline

            opts, lay, cfg = self.options, self.layout, run.config
            self._runner = build_pipeline(
                run.model,
                pp_group=lay.pp_group,
                pp_rank=lay.pp_rank,
                pp_size=lay.pp,
                virtual_stages=opts.virtual_stages,
                n_microbatches=opts.n_microbatches or lay.pp,
                device=self.device,
                autocast=torch.bfloat16 if self._bf16(cfg.train) else None,
                micro_batch=(cfg.train.micro_batch_size, cfg.data.seq_len),
            )
            # the orchestrator's metrics read the whole model's max logits: reduce over stages
            run.model.max_logits = self._runner.max_logits
        return self._runner

    # --- set-up ---------------------------------------------------------------------------
    def _held_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules this rank trains: its stage's layers (+ embedding / norm and head)."""
        lay = self.layout
        if lay.pp == 1:
            return [model]
        from .pipeline import stage_layer_ids

        inner = model.model
        ids = stage_layer_ids(len(inner.layers), lay.pp, self.options.virtual_stages, lay.pp_rank)
        held = [inner.layers[i] for i in ids] + [inner.rotary_emb]
        if lay.pp_rank == 0:
            held.append(inner.embed_tokens)
        if lay.pp_rank == lay.pp - 1:
            held += [inner.norm, model.lm_head]
        return held

    def parallelize(self, model: nn.Module, seed: int) -> nn.Module:
        """Shard experts (on meta), materialise and initialise this rank's share on its
        device, then apply the activation policy; other stages' parameters stay on meta."""
        lay = self.layout
        if lay.pp > 1 and model.config.tie_word_embeddings:
            raise ConfigError(
                "model.tie_word_embeddings: a tied head spans the first and last "
                "pipeline ranks; untie it (K2 is untied) or use pp=1"
            )
        parallelize(model, self.options, self.layout, activations=False)
        held: set[int] = set()
        bf16 = self.dtype == "bf16"
        for m in self._held_modules(model):  # BF16 weights allocated as such (no FP32 detour)
            materialize(m, self.device, torch.bfloat16 if bf16 else None)
        model.tie_weights()
        for m in self._held_modules(model):
            held.update(id(p) for p in m.parameters())
        for p in model.parameters():
            if id(p) not in held:  # another stage trains it: no optimizer or gradient sees it
                p.requires_grad_(False)
        model.init_weights(seed)
        if bf16:
            # the report's policy: BF16 weights, FP32 gradient buffers (master weights and
            # state are the optimizer's, FP32, ZeRO-sharded)
            use_low_precision_weights(model, torch.bfloat16)
        self._model = parallelize(model, self.options, self.layout, experts=False)
        return self._model

    def autocast(self, bf16: bool) -> Any:
        """bf16 autocast when asked, and always with BF16 weights (norms and softmax in FP32)."""
        on = bf16 or self.dtype == "bf16"
        return autocast(self.device.type, torch.bfloat16, enabled=on)

    def local_state_bytes(self, cfg: Any) -> list[int]:
        """Per process of this host (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE): the weights,
        gradients and ZeRO-1 optimizer state of its pipeline stage, as the planner counts them
        for this layout and dtype policy."""
        import os

        from .memory import stage_state
        from .plan import partition_layers

        lay, o = self.layout, self.options
        _, stages = partition_layers(cfg.model.num_hidden_layers, lay.pp, o.virtual_stages)
        first = self.rank - int(os.environ.get("LOCAL_RANK", "0"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        out = []
        for r in range(first, min(first + local, self.world_size)):
            s = r // (lay.dp * lay.ep)
            st = stage_state(
                cfg.model,
                cfg.moe,
                stages[s],
                first=s == 0,
                last=s == lay.pp - 1,
                ep=lay.ep,
                dp=lay.dp,
                master_weights=self.dtype == "bf16",
            )
            weights = st.bf16_params if self.dtype == "bf16" else 2 * st.bf16_params
            out.append(int(weights + st.fp32_grads + st.optimizer))
        return out

    def wrap_optimizer(self, model: nn.Module, optimizer: Any) -> Any:
        """The optimizer re-homed on the layout (ZeRO-1 over dp when zero_stage=1; with
        engine=deepspeed, K2's MuonClip inside a DeepSpeed ZeRO-1 engine)."""
        if self.options.engine == "deepspeed":
            opt = make_deepspeed_optimizer(model, optimizer, self.layout)
        else:
            # ZeRO row splits on the checkpoint's chunk grid: each owner writes whole chunks
            opt = make_zero1_optimizer(
                model,
                optimizer,
                self.layout,
                self.options.zero_stage,
                row_align=lambda p: chunk_rows(global_rows(p)[1]),
            )
        if self.dtype == "bf16" and hasattr(opt, "init_state"):
            # masters and moments claimed now, before any step's temporaries: allocated at the
            # first step they land above the freed BF16 gradients and the heap keeps the hole
            # (measured: +0.45 GiB of RSS on a 72M-parameter model, +0.05 GiB peak this way)
            opt.init_state()
        opt._k2_timeout_s = self.options.timeout_s
        opt.step = types.MethodType(_guarded_step, opt)  # before any lr schedule wraps it
        self._param_index = [p for g in opt.param_groups for p in g["params"]]
        return opt

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Max over every rank of the job."""
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    # --- the step -------------------------------------------------------------------------
    def train_step(self, run: Any, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of the step's micro-batches, gradient and load reduction, global
        clipping; returns (loss averaged over the data ranks, global grad norm)."""
        cfg, model, lay = run.config.train, run.model, self.layout
        dev = self.device
        try:
            loss_sum = torch.zeros((), device=dev)
            if lay.pp > 1:
                runner = self._pipeline(run)
                for _ in range(cfg.grad_accum):
                    batch = next(batches) if batches is not None else None
                    loss = runner.step(batch, loss_scale=1.0 / cfg.grad_accum)
                    if loss is not None:
                        loss_sum += loss.to(dev)
                loss_sum = runner.broadcast_loss(loss_sum)
            else:
                for _ in range(cfg.grad_accum):
                    batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
                    with self.autocast(cfg.bf16):
                        loss = model(**batch, return_logits=False).loss
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach().float()
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            raise _collective_error(
                self.rank, f"step {run.step + 1}", self.options.timeout_s, exc
            ) from None
        return self.finish_step(run, loss_sum / cfg.grad_accum)

    def finish_step(self, run: Any, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After this rank's backward: average the gradients and sum the MoE load over the data
        ranks, clip by the global norm; (loss averaged over the data ranks, grad norm)."""
        lay = self.layout
        try:
            reduce_gradients(run.model, lay)
            self._reduce_expert_counts(run.model)
            loss = loss.detach().float().to(self.device)
            if lay.data_size > 1:
                dist.all_reduce(loss, group=lay.data_group)
            loss_mean = loss / lay.data_size
            clip = run.config.train.grad_clip if run.config.train.grad_clip > 0 else float("inf")
            grad_norm = clip_global_grad_norm(run.model, lay, clip)
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            raise _collective_error(
                self.rank, f"step {run.step + 1}", self.options.timeout_s, exc
            ) from None
        if self.device.type == "meta":  # a dry run: no values to bring back
            return loss_mean, grad_norm
        return loss_mean.cpu(), grad_norm.cpu()

    @torch.no_grad()
    def evaluate(self, run: Any) -> float:
        """Validation loss over `train.eval_batches` batches of every data rank's val shard,
        averaged over the data ranks (pipelined forward-only when pp > 1); the same on every
        rank."""
        cfg, model, lay, dev = run.config.train, run.model, self.layout, self.device
        was_training = model.training
        model.eval()  # also stops MoE load counting
        model.set_record_max_logits(False)
        it = iter(run.val_loader) if run.val_loader is not None else None
        total = torch.zeros((), device=dev)
        try:
            for _ in range(cfg.eval_batches):
                if lay.pp > 1:
                    runner = self._pipeline(run)
                    batch = next(it) if it is not None else None
                    total += runner.broadcast_loss(runner.eval_step(batch))
                    continue
                batch = {k: v.to(dev, non_blocking=True) for k, v in next(it).items()}
                with self.autocast(cfg.bf16):
                    total += model(**batch, return_logits=False).loss.float()
            if lay.data_size > 1:
                dist.all_reduce(total, group=lay.data_group)
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            raise _collective_error(
                self.rank, f"evaluation at step {run.step}", self.options.timeout_s, exc
            ) from None
        finally:
            model.train(was_training)
        return float(total) / (cfg.eval_batches * lay.data_size)

    @torch.no_grad()
    def _reduce_expert_counts(self, model: nn.Module) -> None:
        """Sum every MoE layer's token counts over the data ranks: the router bias update then
        uses the global load (one flat all-reduce for all layers)."""
        if self.layout.data_size == 1:
            return
        counts = [m.expert_counts for _, m in moe_layers(model) if not m.expert_counts.is_meta]
        if not counts:
            return
        flat = torch.cat(counts)
        dist.all_reduce(flat, group=self.layout.data_group)
        torch._foreach_copy_(counts, list(flat.split([c.numel() for c in counts])))

    # --- checkpoints ----------------------------------------------------------------------
    def checkpoint_sharding(self, model: nn.Module, optimizer: Any) -> Any:
        """Who writes what of a checkpoint on this layout (`checkpointing.LayoutSharding`)."""
        from .checkpointing import LayoutSharding

        experts = {n for n, p in model.named_parameters() if getattr(p, EP_ATTR, False)}
        zero_owned = self.options.engine == "k2" and self.options.zero_stage == 1
        holds = None
        if self.device.type == "meta":  # everything is on meta: say which tensors are held
            mine = {
                id(t) for m in self._held_modules(model) for t in (*m.parameters(), *m.buffers())
            }
            holds = lambda t: id(t) in mine  # noqa: E731
        return LayoutSharding(self.layout, experts, zero_owned, holds)

    def save_train_state(
        self,
        root: str,
        step: int,
        *,
        model: nn.Module,
        optimizer: Any,
        scheduler: Any = None,
        loader: Any = None,
        keep: int = 2,
        attrs: dict[str, Any] | None = None,
    ) -> str:
        """Every rank writes its share of the layout-free checkpoint (collective): its ZeRO-1
        state, its part of the replicated tensors; rank 0 commits after a barrier."""
        from k2_core.trainstate import save_train_state

        try:
            view = _FullStateView(optimizer) if self.options.engine == "deepspeed" else optimizer
            return save_train_state(
                root,
                step,
                model=model,
                optimizer=view,
                scheduler=scheduler,
                loader=loader,
                keep=keep,
                attrs=attrs,
                sharding=self.checkpoint_sharding(model, optimizer),
            )
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            raise _collective_error(
                self.rank, f"the checkpoint of step {step}", self.options.timeout_s, exc
            ) from None

    def load_train_state(
        self,
        uri: str,
        *,
        model: nn.Module,
        optimizer: Any = None,
        scheduler: Any = None,
        loader: Any = None,
        stats: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Read the rows this rank holds of a checkpoint written under any layout."""
        from k2_core.trainstate import load_train_state

        if optimizer is not None and self.options.engine == "deepspeed":
            optimizer = _FullStateView(optimizer)
        return load_train_state(
            uri, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, stats=stats
        )


class _FullStateView:
    """DeepSpeed's optimizer as k2_core.trainstate reads and fills one: its state whole, keyed
    by parameter (every rank holds all of it, so the dp ranks spread the writing; a load hands
    every rank the whole state, which DeepSpeed cuts into its partitions)."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self._state: dict[Any, Any] | None = None

    @property
    def state(self) -> dict[Any, Any]:
        """The consolidated state by parameter (collective on first use)."""
        if self._state is None:
            flat = [p for g in self.param_groups for p in g["params"]]
            sd = self.optimizer.consolidated_state_dict()
            self._state = {flat[int(pid)]: st for pid, st in sd["state"].items()}
        return self._state

    def owned_rows(self, p: torch.Tensor) -> tuple[int, int]:
        """Every row: the state is whole."""
        return (0, int(p.shape[0]) if p.dim() else 1)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a whole state dict into the wrapped optimizer."""
        self.optimizer.load_state_dict({k: v for k, v in sd.items() if k != "owned_rows"})


def build_h800_backend(*, options: H800Options) -> H800Backend:
    """The `h800` backend (joins the torchrun job and builds the mesh)."""
    return H800Backend(options)
