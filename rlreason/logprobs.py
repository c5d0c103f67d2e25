"""Per-token log-probabilities of completions under a model, the quantity every policy loss is built from."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token | prefix) at ``temperature`` [N, Lc], and the per-token entropy (detached unless
    ``entropy_grad``, which an entropy bonus needs).

    The logits are divided by the sampling temperature so that the ratio against the sampling policy is 1 when
    nothing changed. Position ids follow the attention mask, as in ``generate``, so left padding does not shift
    the prompt's positions. Logits are computed for completion positions only (``logits_to_keep``).
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    length = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=length + 1).logits
    logits = logits[:, :-1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logprobs, entropy
