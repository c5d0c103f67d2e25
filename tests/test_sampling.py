import torch

from rlreason.rollout.sampling import DRAW_BLOCK, draw, uniforms


def flat_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The textbook draw: one float64 cumulative sum over the whole vocabulary."""
    cdf = probs.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)


def test_two_level_draw_matches_the_flat_inverse_cdf():
    torch.manual_seed(0)
    vocab = 3 * DRAW_BLOCK + 77  # not a whole number of blocks
    logits = torch.randn(64, vocab) * 3
    logits[:, ::5] = float("-inf")  # tokens that must never be drawn
    probs = torch.softmax(logits, dim=-1) * 7  # not normalised
    u = uniforms(torch.arange(64), 3)
    tokens = draw(probs, u)
    assert torch.equal(tokens, flat_inverse_cdf(probs, u))
    assert bool((probs.gather(1, tokens.unsqueeze(1)) > 0).all())


def test_draw_edges_pick_tokens_with_probability():
    probs = torch.zeros(3, 2 * DRAW_BLOCK)
    probs[:, 5] = 1.0  # all mass on one token, the rest of its block empty
    probs[1, DRAW_BLOCK + 9] = 1.0
    u = torch.tensor([1e-12, 1 - 1e-12, 0.5], dtype=torch.float64)
    assert draw(probs, u).tolist() == [5, DRAW_BLOCK + 9, 5]


def test_draw_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    seeds = torch.arange(20000)
    tokens = draw(probs.expand(20000, 4), uniforms(seeds, 0))
    shares = torch.bincount(tokens, minlength=4).double() / 20000
    assert torch.allclose(shares, probs[0].double(), atol=0.015)
    assert shares[1] == 0


def test_uniforms_take_a_tensor_position():
    seeds = torch.tensor([1, 2, 3])
    assert torch.equal(uniforms(seeds, 7), uniforms(seeds, torch.tensor(7)))
    assert not torch.equal(uniforms(seeds, 7), uniforms(seeds, 8))
