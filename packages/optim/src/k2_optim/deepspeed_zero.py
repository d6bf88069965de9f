"""K2's MuonClip inside DeepSpeed ZeRO-1: DeepSpeed owns the partitioned fp32 master weights,
the AdamW state and the parameter all-gather; K2 computes the Muon update and QK-Clip.

Why not DeepSpeed's own ZeRO Muon (`MuonWithAuxAdam`, orthogonalising in
`get_flat_partition`)? Its update is not K2's, and not all of the difference can be folded
into hyperparameters:
- scale: sqrt(max(1, rows/cols)) instead of K2's 0.2*sqrt(max(rows, cols)) (a per-shape lr
  multiplier would fix this one);
- fused blocks: K2 orthogonalises the gate and up halves of a `muon_split` expert tensor
  [E, 2I, H] separately; DeepSpeed's per-block option (`muon_num_heads`) takes 2-D tensors only;
- clipping: DeepSpeed orthogonalises the unclipped gradient, then clips the orthogonalised
  updates together with the AdamW gradients by their joint norm; K2 clips the raw gradient by
  the global norm before the momentum;
- no QK-Clip.
So the Muon matrices reach DeepSpeed as ordinary parameters whose gradient is K2's scaled
direction, and the inner optimizer DeepSpeed wraps (`ZeroInnerMuon`) applies it as decoupled
weight decay plus a plain step; the AdamW groups get K2's AdamW on the flat partition.

`DeepSpeedMuonClip.step()` (the gradients are already averaged over the data ranks and clipped
by the caller, in fp32):
1. K2 momentum and batched Newton-Schulz for the matrices of this rank's ZeRO partition only
   (a matrix cut by a partition boundary is computed by each rank holding a part of it), their
   momentum kept here, whole, keyed like a single-process MuonClip's;
2. DeepSpeed's partition epilogue copies this rank's gradient partition (no second reduction:
   `engine.enable_backward_allreduce` is off), `engine.step()` updates the fp32 partition and
   all-gathers the weights;
3. QK-Clip from the max logits all-reduced (MAX) over the group, so every rank applies the
   same factors; the clipped weights are copied into DeepSpeed's fp32 master fragments.

deepspeed is imported only when `DeepSpeedMuonClip.initialize()` runs, so k2_optim still
imports (and everything else works) with torch alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import rehome_arguments
from .muon import Muon
from .qkclip import MuonClip

#: DeepSpeed settings this integration relies on (merged over the caller's config).
REQUIRED_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 1,  # batches are the caller's; DeepSpeed needs a value
    "gradient_accumulation_steps": 1,  # micro-batches accumulate in fp32 .grad before step()
    "gradient_clipping": 0.0,  # K2 clips the raw gradient before the momentum
    "zero_allow_untested_optimizer": True,
    "data_types": {"grad_accum_dtype": "fp32"},
}


def _require_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - deepspeed is optional for k2_optim
        raise ImportError("DeepSpeedMuonClip needs deepspeed (pip install deepspeed)") from exc
    return deepspeed


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config used: ZeRO stage 1 plus REQUIRED_CONFIG over `config`."""
    cfg = _merge(
        {
            "zero_optimization": {"stage": 1, "compute_grad_norm": False},
            "steps_per_print": 2**31 - 1,
        },
        config or {},
    )
    cfg = _merge(cfg, REQUIRED_CONFIG)
    stage = cfg["zero_optimization"].get("stage")
    if stage != 1:
        raise ValueError(
            f"DeepSpeedMuonClip runs ZeRO stage 1 only, got zero_optimization.stage={stage}"
        )
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled"):
            raise ValueError(
                f"DeepSpeedMuonClip keeps fp32 weights: {key}.enabled must be false "
                "(autocast the forward instead)"
            )
    return cfg


class ZeroInnerMuon(Muon):
    """The optimizer DeepSpeed ZeRO-1 wraps: it sees this rank's flat fp32 partition of each
    group. Muon groups: the gradient is K2's scaled direction already (see the module doc),
    so p <- p*(1 - lr*wd) - lr*grad; AdamW groups: K2's AdamW."""

    def _muon_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Muon.step's Muon-group update on the flat partition: the direction is the grad."""
        lr, wd = float(group["lr"]), group["weight_decay"]
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)


class DeepSpeedMuonClip(MuonClip):
    """MuonClip whose state is partitioned by DeepSpeed ZeRO-1 (see the module doc).

    Same arguments as MuonClip plus `process_group` (the data-parallel group; DeepSpeed's
    must be the same ranks). Call `initialize(model, config)` once to build the engine; then
    per step: backward into `.grad`, average over the group and clip (the caller), `step()`,
    `zero_grad()`. `state_dict()` (collective through `consolidated_state_dict`) is the
    single-process MuonClip layout, so `load_state_dict` takes a single-process or any
    DistributedMuonClip checkpoint too.
    """

    def __init__(self, params: Any, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DeepSpeedMuonClip needs an initialised torch.distributed group")
        self.process_group = process_group
        if kwargs.get("max_logit_reduce") is None:
            kwargs["max_logit_reduce"] = self._all_reduce_max
        super().__init__(params, *args, **kwargs)
        d = self.defaults
        self.inner = ZeroInnerMuon(
            [{k: v for k, v in g.items() if k != "initial_lr"} for g in self.param_groups],
            d["lr"],
            d["weight_decay"],
            d["momentum"],
            d["nesterov"],
            d["ns_steps"],
            d["ns_coefficients"],
            d["ns_eps"],
            d["adjust_lr_fn"],
            adamw_betas=d["betas"],
            adamw_eps=d["eps"],
            ns_dtype=self.ns_dtype,
        )
        self.engine: Any = None
        self._owned_ids: set[int] = set()

    def _all_reduce_max(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return t

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # --- set-up ---------------------------------------------------------------------------
    def initialize(self, model: nn.Module, config: dict[str, Any] | None = None) -> Any:
        """Build the DeepSpeed ZeRO-1 engine over `model` with `self.inner`; returns it."""
        deepspeed = _require_deepspeed()
        if dist.get_world_size(self.process_group) != dist.get_world_size():
            raise ValueError(
                "DeepSpeedMuonClip: DeepSpeed's data-parallel group is the whole "
                "job, so process_group must hold every rank"
            )
        bad = sorted({str(p.dtype) for p in self._params() if p.dtype != torch.float32})
        if bad:
            raise ValueError(f"DeepSpeedMuonClip keeps fp32 weights, got {', '.join(bad)}")
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=self.inner,
            config=deepspeed_config(config),
            dist_init_required=False,
        )
        # gradients arrive averaged and clipped: DeepSpeed must not reduce them again
        engine.enable_backward_allreduce = False
        self.engine = engine
        self._owned_ids = {id(p) for part in engine.optimizer.params_in_partition for p in part}
        for p in self._params():  # ZeRO-1: momentum only for this rank's matrices
            if id(p) not in self._owned_ids:
                self.state.pop(p, None)
        return engine

    def _owned(self, p: Tensor) -> bool:
        return self.engine is None or id(p) in self._owned_ids

    # --- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def write_directions(self) -> None:
        """Step phase 1: K2's Muon update (momentum, Nesterov, batched NS, scale) of this
        rank's matrices written into their .grad (every matrix before `initialize`)."""
        for group in self.param_groups:
            if group["use_muon"]:
                params = [p for p in group["params"] if p.grad is not None and self._owned(p)]
                if params:
                    self._write_directions(group, params)

    def _write_directions(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for idxs, outs, scale in self._directions(group, params):
            grads = [params[i].grad for i in idxs]
            torch._foreach_copy_(grads, outs)
            torch._foreach_mul_(grads, scale)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """K2 Muon directions, DeepSpeed's ZeRO-1 update and all-gather, then QK-Clip."""
        if self.engine is None:
            raise RuntimeError("DeepSpeedMuonClip.step() before initialize(model, config)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner["lr"], inner["weight_decay"] = group["lr"], group["weight_decay"]  # schedule
        self.write_directions()
        zero = self.engine.optimizer
        zero.set_gradient_accumulation_boundary(True)
        zero.overlapping_partition_gradients_reduce_epilogue()  # copy the partition, no comm
        self.engine.step()
        self.apply_qk_clip()
        return loss

    @torch.no_grad()
    def apply_qk_clip(self) -> dict[str, Tensor] | None:
        """MuonClip's QK-Clip on the model weights, then the same rows in the fp32 master."""
        stats = super().apply_qk_clip()
        if stats is not None and self.engine is not None:
            from deepspeed.utils import safe_set_full_fp32_param

            for t in self.qk_clip_targets:  # weights are fp32 and equal to the master copy
                for w in (t.q_weight, t.k_weight, t.q_bias, t.k_bias):
                    if w is not None:
                        safe_set_full_fp32_param(w, w.detach())
        return stats

    # --- state ----------------------------------------------------------------------------
    def _adam_items(self) -> list[tuple[int, Tensor, dict[str, Any]]]:
        return [
            (i, p, g)
            for i, (p, g) in enumerate((p, g) for g in self.param_groups for p in g["params"])
            if not g["use_muon"]
        ]

    def consolidated_state_dict(self) -> dict[str, Any]:
        """Collective: the single-process MuonClip state dict (momentum of every matrix, AdamW
        moments gathered from DeepSpeed's partitions), on every rank."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_state_fragments()
        sd = super().state_dict()
        local = {
            k: {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        }
        shards: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(shards, local, group=self.process_group)
        state: dict[int, dict[str, Any]] = {}
        for shard in shards:
            state.update(shard)
        inner_steps = {
            id(g): int(self.inner.state.get(g["params"][0], {}).get("step", 0))
            for g in self.inner.param_groups
            if g["params"]
        }
        for (i, p, _g), inner in zip(self._adam_items(), self._inner_adam_groups(), strict=True):
            st = {}
            for key in ("exp_avg", "exp_avg_sq"):
                v = safe_get_full_optimizer_state(p, key)
                if v is not None:
                    st[key] = v.detach().cpu()
            if st:
                st["step"] = inner_steps[id(inner)]
                state[i] = st
        return {"state": state, "param_groups": sd["param_groups"]}

    def _link_state_fragments(self) -> None:
        """Point every parameter's DeepSpeed fragment at the inner optimizer's current state
        (DeepSpeed links once, after the first group's first update, before the AdamW groups
        have any state)."""
        zero = self.engine.optimizer
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _inner_adam_groups(self) -> list[dict[str, Any]]:
        """The inner group of each AdamW parameter, in `_adam_items` order."""
        out = []
        for g, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            if not g["use_muon"]:
                out.extend([inner] * len(g["params"]))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Collective: `consolidated_state_dict()`."""
        return self.consolidated_state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a single-process-layout MuonClip state dict: hyperparameters and this rank's
        momentum here, AdamW moments and the (already loaded) model weights into DeepSpeed's
        fp32 partitions."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        sd = {k: state_dict[k] for k in ("state", "param_groups")}
        super().load_state_dict(sd)
        zero = self.engine.optimizer
        for p in self._params():  # the model weights were loaded before the optimizer
            safe_set_full_fp32_param(p, p.detach())
        steps: dict[int, int] = {}
        for (_i, p, _g), inner in zip(self._adam_items(), self._inner_adam_groups(), strict=True):
            st = self.state.pop(p, {})
            if "exp_avg" in st:
                steps[id(inner)] = int(st["step"])
        # create the inner state DeepSpeed links its fragments to, then fill the fragments
        for inner, flat in zip(
            self.inner.param_groups, zero.single_partition_of_fp32_groups, strict=True
        ):
            if id(inner) in steps:
                self.inner.state[flat] = {
                    "step": steps[id(inner)],
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        self._link_state_fragments()
        for p in self._params():
            st = sd["state"].get(self._index_of(p))
            if st is None or "exp_avg" not in st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, st[key].to(p.device, torch.float32), key)
        for p in self._params():
            if not self._owned(p):
                self.state.pop(p, None)

    def _index_of(self, p: Tensor) -> int:
        if not hasattr(self, "_index_cache"):
            self._index_cache = {id(q): i for i, q in enumerate(self._params())}
        return self._index_cache[id(p)]


def to_deepspeed(
    optimizer: Muon, process_group: Any = None, *, max_logit_reduce: Any = None
) -> DeepSpeedMuonClip:
    """`optimizer` (a Muon or MuonClip) as a DeepSpeedMuonClip with the same settings (call
    `initialize(model, config)` on the result)."""
    groups, kwargs = rehome_arguments(optimizer)
    return DeepSpeedMuonClip(
        groups, process_group=process_group, max_logit_reduce=max_logit_reduce, **kwargs
    )
