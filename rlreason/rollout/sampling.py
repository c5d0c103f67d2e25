"""Token sampling whose randomness belongs to the completion, not to the batch it happens to be in.

Each completion has a 64-bit seed; the uniform number that picks its token at position t is a hash of
(seed, t). So a completion is the same whether it is sampled alone, in a batch of 32, or on the other of two
processes, and a resumed run samples exactly what an uninterrupted one would. The hash is plain integer tensor
arithmetic, so it runs on any device and inside CUDA graphs.
"""

from __future__ import annotations

import hashlib

import torch

_MASK_63 = (1 << 63) - 1


def completion_seed(run_seed: int, prompt_draw: int, sample: int) -> int:
    """A stable 63-bit seed for sample ``sample`` of the ``prompt_draw``-th prompt the run draws (its data position)."""
    digest = hashlib.blake2b(f"{run_seed}:{prompt_draw}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style finaliser on int64 (wrapping multiply; logical shifts done with masks)."""
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
    return x ^ ((x >> 32) & ((1 << 32) - 1))


def uniforms(seeds: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """[B] float64 in (0, 1): one per completion for the token at ``position`` (an int, or a 0-d tensor on the
    seeds' device, as a CUDA graph needs it)."""
    steps = position if isinstance(position, torch.Tensor) else torch.full_like(seeds, position)
    x = _mix(_mix(seeds) + steps * 0x2545F4914F6CDD1D)
    return (((x >> 11) & ((1 << 53) - 1)).double() + 0.5) / float(1 << 53)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Logits of the sampling distribution: temperature, then top-k, then top-p (nucleus); removed tokens -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


DRAW_BLOCK = 1024
"""Tokens per block of ``draw``'s two-level search."""


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] tokens by inverse CDF: the first token whose cumulative probability exceeds ``u`` x the row's total.

    ``probs`` [B, V] need not be normalised. The cumulative sum is taken in float64, so rounding cannot move a draw
    across a small token's interval, but only over block totals and then inside the one block the draw falls in:
    one read of ``probs`` instead of a float64 copy and a float64 scan of all of it.
    """
    B, V = probs.shape
    blocks = -(-V // DRAW_BLOCK)
    if blocks * DRAW_BLOCK != V:
        probs = torch.nn.functional.pad(probs, (0, blocks * DRAW_BLOCK - V))
    probs = probs.view(B, blocks, DRAW_BLOCK)
    mass = probs.sum(dim=-1, dtype=torch.float64)  # [B, blocks]
    cdf = mass.cumsum(dim=-1)
    target = u.to(cdf.device, torch.float64) * cdf[:, -1]
    # the block where the cumulative sum first exceeds the target; it holds some probability
    block = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).clamp(max=blocks - 1)
    rest = (target.unsqueeze(-1) - (cdf - mass).gather(-1, block)).clamp(min=0)
    inside = probs.gather(1, block.unsqueeze(-1).expand(B, 1, DRAW_BLOCK)).squeeze(1).double().cumsum(dim=-1)
    # rounding may put ``rest`` past the block's total: stop at its last token with probability
    last = (inside < inside[:, -1:]).sum(dim=-1, keepdim=True)
    token = torch.searchsorted(inside, rest, right=True).clamp(max=last)
    return (block * DRAW_BLOCK + token).squeeze(-1)


def sample(
    logits: torch.Tensor, seeds: torch.Tensor, position: int | torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """[B] token ids drawn by inverse CDF with each completion's own uniform for this position (see ``uniforms``)."""
    probs = torch.softmax(filter_logits(logits, temperature, top_p, top_k), dim=-1)
    return draw(probs, uniforms(seeds, position))
