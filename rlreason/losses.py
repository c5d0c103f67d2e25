"""Policy objectives: pure functions on per-token tensors [N, L] with a mask of real completion tokens.

The loss of a batch is ``sum(per_token_loss * token_weights)``. Splitting that sum over micro-batches gives the
same gradient as one big batch, and the choice of ``token_weights`` is the aggregation:
GRPO averages tokens within each sequence, then sequences (each sequence weighs the same).
"""

from __future__ import annotations

import torch


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - policy >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective per token, negated for minimisation, plus ``beta`` x k3 KL to the reference.

    ``advantages`` is [N] (one per sequence, broadcast over its tokens). Returns the per-token loss [N, L] and
    per-token diagnostics (ratio, whether clipping was active, KL).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    loss = -torch.min(unclipped, clipped)
    stats = {"ratio": ratio.detach(), "clipped": (clipped < unclipped).detach()}
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probabilities")
        kl = kl_k3(logprobs, ref_logprobs)
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


def grpo_token_weights(mask: torch.Tensor) -> torch.Tensor:
    """Weights that make ``sum(loss * w)`` the mean over sequences of each sequence's token mean."""
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask / lengths / mask.shape[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
