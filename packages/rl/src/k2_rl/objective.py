"""The Kimi k1.5 / K2 RL objective and the per-token log-probabilities it needs.

    L = E_x [ 1/K sum_i ( r_i - mean_j r_j - tau * log(pi(y_i|x) / pi_old(y_i|x)) )^2 ]

`log pi(y|x)` is summed over the response tokens. `pi_old` is what sampled the response: its
per-token log-probabilities are recorded at sampling time, and a response resumed over several
iterations (partial rollout) carries, for each token, the log-probability under the policy
version that produced it, so the sum is the log-probability of the mixture that sampled it.
Samples excluded from the advantage (e.g. a sandbox error) are left out of the group mean and
of the loss; a group with fewer than two valid samples has no baseline and contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ObjectiveOutput:
    """The loss and the detached statistics logged with it."""

    loss: torch.Tensor
    advantage: torch.Tensor  # [N] r_i - mean_j r_j (0 where excluded)
    log_ratio: torch.Tensor  # [N] log pi - log pi_old (detached)
    valid: torch.Tensor  # [N] bool: in the loss


def group_baseline(
    rewards: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean reward of each sample's group over valid samples, valid count of that group)."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    w = valid.to(rewards.dtype)
    sums = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, groups, rewards * w)
    counts = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, groups, w)
    mean = sums / counts.clamp_min(1)
    return mean[groups], counts[groups]


@dataclass
class Advantages:
    """Per-sample advantage, weight (1/K of its group, 0 when left out), and the group count."""

    advantage: torch.Tensor  # [N]
    weight: torch.Tensor  # [N]
    valid: torch.Tensor  # [N] bool
    n_groups: int


def advantages(
    rewards: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor | None = None
) -> Advantages:
    """r_i - mean_j r_j within each group over valid samples; groups of < 2 valid drop out."""
    rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    mean, count = group_baseline(rewards, groups, valid)
    valid = valid & (count >= 2)
    adv = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    weight = torch.where(valid, 1.0 / count.clamp_min(1), torch.zeros_like(count))
    return Advantages(adv, weight, valid, torch.unique(groups[valid]).numel())


def k15_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: Advantages,
    *,
    tau: float,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """This slice's share of the loss: sum_i w_i (a_i - tau * log-ratio_i)^2 / groups.

    The loss is a sum over samples once the advantages are fixed, so micro-batches (`index`
    selects theirs) add up to the whole loss exactly.
    """
    a, w = adv.advantage, adv.weight
    if index is not None:
        a, w = a[index], w[index]
    per = (a.to(logp.dtype) - tau * (logp - old_logp.to(logp.dtype))) ** 2
    return (per * w.to(logp.dtype)).sum() / max(adv.n_groups, 1)


def k15_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The K1.5 squared loss over N samples in groups (one group per prompt).

    logp [N]: log pi(y_i|x) summed over response tokens (with grad); old_logp [N]: the same
    under the sampling policy; rewards [N]; groups [N] int64 prompt index (0..G-1).
    """
    adv = advantages(rewards, groups, valid)
    loss = k15_terms(logp, old_logp, adv, tau=tau)
    log_ratio = (logp - old_logp.to(logp.dtype)).detach()
    return ObjectiveOutput(loss, adv.advantage, log_ratio, adv.valid)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi of each token given its prefix [B, T], entropy at each position [B, T]).

    input_ids [B, T] hold prompt + response (right-padded); position t of the outputs scores
    token t (the first position gets 0). Both are zero outside `response_mask` [B, T]. The head
    and the softmax run on the response positions only: prompt and padding never reach the
    [tokens, vocab] logits.
    """
    sel = response_mask[:, 1:].bool()  # hidden state t-1 predicts token t
    stack, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if stack is not None and head is not None:
        logits = head(stack(input_ids[:, :-1])[sel]).float()  # [N, V]
    else:
        logits = model(input_ids[:, :-1], return_logits=True).logits[sel].float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:][sel][:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    pad = picked.new_zeros(input_ids.shape[0], 1)
    full = torch.zeros_like(sel, dtype=picked.dtype)
    lp = torch.cat([pad, full.masked_scatter(sel, picked)], 1)
    ent = torch.cat([pad, full.masked_scatter(sel, entropy)], 1)
    return lp, ent


def sequence_logprob(token_lp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probabilities over each row's response tokens [B]."""
    return (token_lp * response_mask.to(token_lp.dtype)).sum(-1)


class K15:
    """The `rl_algorithm` k15: the squared K1.5 loss with its tau."""

    def __init__(self, tau: float):
        self.tau = tau

    def loss(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        adv: Advantages,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This micro-batch's share of the loss (see `k15_terms`)."""
        return k15_terms(logp, old_logp, adv, tau=self.tau, index=index)


def build_k15(*, options: object) -> K15:
    """The Kimi k1.5 / K2 objective: (r - mean r - tau * log(pi/pi_old))^2 on response tokens."""
    return K15(float(options.tau))
