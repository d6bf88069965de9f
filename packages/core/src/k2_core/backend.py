"""The backend contract: what the orchestrator asks of a `backend` slot implementation.

The orchestrator (`build_run`, `train`) calls, in order:

1. `parallelize(model, seed)` with the model built on the meta device: the backend
   materialises on its device only the parameters this process trains (its pipeline stage's
   layers, its experts) and initialises them layout-free (`K2ForCausalLM.init_weights`);
2. `wrap_optimizer(model, optimizer)` (e.g. ZeRO-1 over the data-parallel ranks);
3. per step `train_step(run, batches)` -> (mean loss, global grad norm), gradients reduced
   and clipped, then the orchestrator's one update sequence (`apply_update`). A stage that
   runs its own forward/backward (the RL objective) calls `finish_step(run, loss)` instead,
   which does the same reduction and clipping;
4. `evaluate(run)` for the validation loss; `save_train_state` / `load_train_state` for
   checkpoints (a backend owns the layout it writes and reads).

`reads_data` says whether this process reads the dataset (a pipeline's middle stages do not);
`data_rank` / `data_world_size` say which shard it reads. `Backend` gives the one-process
defaults; `SingleProcessBackend` is k2-core's `single` backend.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


class Backend:
    """Defaults for one process on one device; distributed backends override what differs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def data_rank(self) -> int:
        """This process's shard of the dataset."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """How many shards the dataset is read in."""
        return self.world_size

    @property
    def reads_data(self) -> bool:
        """Whether this process reads batches (False on a pipeline's later stages)."""
        return True

    # --- set-up ---------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, seed: int) -> nn.Module:
        """Materialise the (meta) model on this device and initialise it from `seed`."""
        from .model.init import materialize

        materialize(model, self.device)
        model.tie_weights()
        model.init_weights(seed)
        return model

    def wrap_optimizer(self, model: nn.Module, optimizer: Any) -> Any:
        """The optimizer as this backend runs it (unchanged here)."""
        return optimizer

    def local_state_bytes(self, cfg: Any) -> list[int]:
        """Bytes of training state each process on this host will hold (here one process, the
        whole model in fp32: weights, gradients, Muon momentum; AdamW's two moments for the
        embedding and head)."""
        from .params import count_parameters

        c = count_parameters(cfg.model, cfg.moe)
        return [12 * c["total"] + 4 * (c["embedding"] + c["lm_head"])]

    def autocast(self, bf16: bool) -> AbstractContextManager:
        """bf16 autocast on this backend's device type when `bf16`, else a no-op context."""
        from .precision import autocast

        return autocast(self.device.type, torch.bfloat16, enabled=bf16)

    # --- the step -------------------------------------------------------------------------
    def train_step(self, run: Any, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the step's micro-batches, then clip; (mean loss, grad norm)."""
        cfg, model = run.config.train, run.model
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            with self.autocast(cfg.bf16):
                loss = model(**batch, return_logits=False).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        return self.finish_step(run, loss_sum / cfg.grad_accum)

    def finish_step(self, run: Any, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After this process's backward: reduce the gradients (and the MoE load) over the data
        ranks, clip by the global norm; (loss averaged over the data ranks, grad norm)."""
        clip = run.config.train.grad_clip if run.config.train.grad_clip > 0 else float("inf")
        return loss, torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)

    @torch.no_grad()
    def evaluate(self, run: Any) -> float:
        """Mean validation loss over `train.eval_batches` batches of the run's val loader."""
        from .orchestrator import evaluate

        cfg = run.config.train
        return evaluate(run.model, run.val_loader, cfg.eval_batches, cfg.bf16, self.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Max over the processes of the job (the identity with one)."""
        return t

    # --- checkpoints ----------------------------------------------------------------------
    def checkpoint_sharding(self, model: nn.Module, optimizer: Any) -> Any:
        """Who writes (and pushes) what of the state: here this one process, everything."""
        from .trainstate import OneProcess

        return OneProcess()

    def save_train_state(self, root: str, step: int, **state: Any) -> str:
        """Write the whole training state for `step` under `root`; returns its URI."""
        from .trainstate import save_train_state

        return save_train_state(root, step, **state)

    def load_train_state(self, uri: str, **state: Any) -> dict[str, Any]:
        """Restore a checkpoint into the given objects; returns its attrs."""
        from .trainstate import load_train_state

        return load_train_state(uri, **state)


class SingleProcessBackend(Backend):
    """Runs everything in this process on one device; rank 0 of a world of 1."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
