"""CPU matrix products through weights packed once into oneDNN's blocked layout (the ops inductor's CPU backend
uses for frozen weights): a product with a plain weight lays it out again at every call, which for a decode step's
few rows costs as much as the product itself, and for a training micro-batch's rows a third of it."""

from __future__ import annotations

import torch


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can pack weights of ``dtype`` on ``device`` (the CPU, float32 or bf16)."""
    return (
        device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` [N, K] packed for x @ weight.T; ``rows`` is the row count oneDNN is told to expect (any works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a ``pack``-ed weight; ``x`` (any leading dims) in the weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
