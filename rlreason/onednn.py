"""CPU matrix products through weights packed once into oneDNN's blocked layout (the ops inductor's CPU backend
uses for frozen weights): a product with a plain weight lays it out again at every call, which for a decode step's
few rows costs as much as the product itself, and for a training micro-batch's rows a third of it."""

from __future__ import annotations

import functools

import torch


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch, on this CPU, can pack weights of ``dtype`` on ``device`` (the CPU, float32 or bf16)."""
    return device.type == "cpu" and _cpu_packs(dtype)


@functools.cache
def _cpu_packs(dtype: torch.dtype) -> bool:
    """Asked once per dtype: oneDNN packs bf16 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    elsewhere raises at the first pack, so one small pack tells."""
    if not (
        dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        pack(torch.ones(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` [N, K] packed for x @ weight.T; ``rows`` is the row count oneDNN is told to expect (any works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a ``pack``-ed weight; ``x`` (any leading dims) in the weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
