"""Mixed precision of the training state: BF16 weights, FP32 gradient accumulation buffers.

The report's policy (and the `h800` backend's default): parameters are held in BF16 for
compute; each trainable parameter gets an FP32 gradient buffer `p.main_grad` into which every
backward's BF16 gradient is added as soon as autograd has accumulated it (a post-accumulate-grad
hook, so at most one parameter's BF16 gradient exists at a time); the optimizer keeps FP32
master weights and state (k2-optim's Muon: `master_weights`).

The contract other packages rely on (k2-optim reads it without importing k2_core):
- a parameter's gradient is `p.main_grad` when the attribute exists, else `p.grad`
  (`grad_of`); gradient reduction, clipping and the optimizer act on that tensor;
- `optimizer.zero_grad()` zeroes `main_grad` buffers (k2-optim's Muon does).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

MAIN_GRAD_ATTR = "main_grad"
#: the parameter dtypes `parallel.options.dtype` names
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer steps with: the FP32 accumulation buffer, else `.grad`."""
    g = getattr(p, MAIN_GRAD_ATTR, None)
    return g if g is not None else p.grad


def _fold_into_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


@torch.no_grad()
def use_low_precision_weights(model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Cast the held trainable parameters to `dtype` in place (buffers keep theirs) and give
    each an FP32 `main_grad` buffer that gradients accumulate into; returns those parameters.

    The Parameter objects stay the same (their attributes, ties and optimizer identity too);
    parameters on the meta device get meta buffers, so a dry run counts their bytes.
    """
    done: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad or not p.is_floating_point():
            continue
        seen.add(id(p))
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        p.register_post_accumulate_grad_hook(_fold_into_main_grad)
        done.append(p)
    return done


def autocast(
    device_type: str, dtype: torch.dtype = torch.bfloat16, enabled: bool = True
) -> AbstractContextManager:
    """torch.autocast on `device_type`; a no-op on the meta device (a dry run: no kernels run,
    and torch has no meta autocast)."""
    if device_type == "meta":
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def host_counts(counts: torch.Tensor, total: int) -> list[int]:
    """`counts.tolist()` (a host sync); on the meta device, which holds no values, `total`
    spread evenly over the entries (a dry run's uniform routing)."""
    if not counts.is_meta:
        return counts.tolist()
    n = counts.numel()
    base, extra = divmod(int(total), n)
    return [base + (1 if i < extra else 0) for i in range(n)]
