"""Fused LM-head + cross-entropy for training: no [tokens, vocab] logits kept for backward.

The forward walks the tokens in chunks: logits of a chunk, their log-sum-exp and loss, and
at once the gradient of the summed loss (softmax - one-hot) pushed through the head into
grad_hidden and grad_weight. The backward only scales those by the incoming gradient. That
skips the separate log-softmax backward pass and keeps one chunk of logits alive, not all.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, in the autocast dtype when autocast is on (as F.linear would be)."""
    if torch.is_autocast_enabled("cpu") and a.device.type == "cpu":
        dt = torch.get_autocast_dtype("cpu")
        return torch.mm(a.to(dt), b.to(dt))
    return torch.mm(a, b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        skip_ignored: bool,
    ) -> torch.Tensor:
        valid = labels != IGNORE
        n_valid = valid.sum().clamp_min(1)
        full = hidden
        skip_ignored = skip_ignored and not bool(valid.all())  # nothing to skip: no copy
        if skip_ignored:
            # only labelled rows reach the head (SFT: prompts and padding are most of a row)
            rows = valid.nonzero().squeeze(1)
            hidden, labels, valid = hidden.index_select(0, rows), labels[rows], valid[rows]
        n = hidden.shape[0]
        safe = labels.clamp_min(0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        wt = weight.t()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h, lab, ok = hidden[s:e], safe[s:e], valid[s:e]
            # One fused log-softmax pass gives the loss; exp_ of it, in place, the softmax.
            logp = torch.log_softmax(_mm(h, wt).float(), dim=-1)
            loss -= (logp.gather(1, lab[:, None]).squeeze(1) * ok).sum()
            if need_h or need_w:
                probs = logp.exp_()
                probs.scatter_add_(1, lab[:, None], -ok[:, None].to(probs.dtype))
                probs.mul_(ok[:, None])
                if need_h:
                    grad_h[s:e] = _mm(probs, weight).to(grad_h.dtype)
                if need_w:
                    grad_w += _mm(probs.t(), h).float()
        if skip_ignored and need_h:
            grad_h = torch.zeros_like(full).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None), n_valid)
        ctx.has = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        n_valid = saved.pop()
        scale = grad_out / n_valid
        need_h, need_w = ctx.has
        gh = saved.pop(0) * scale if need_h else None  # a 0-d scale keeps the hidden dtype
        gw = (saved.pop(0) * scale).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    skip_ignored: bool | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (IGNORE skipped), fused.

    skip_ignored: run the head on labelled rows only. None = on CPU tensors only, where
    finding those rows costs nothing; on an accelerator it would sync the host every step.
    """
    if skip_ignored is None:
        skip_ignored = hidden.device.type == "cpu"
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk, skip_ignored
    )
