"""The CPU training pass's products through oneDNN-packed weights, packed once per optimizer step.

A CPU product with a plain weight lays the weight out in oneDNN's blocked format again at every call (and, under bf16
autocast, casts it first), and a micro-batch multiplies by each weight twice: x @ W.T forward and grad @ W backward.
Inside ``packed_products`` every ``nn.Linear`` of the model, and the head of ``rlreason.training.logprobs``, uses a
copy of its weight packed on first use for each orientation, in the dtype the product runs in (the autocast dtype,
else the weight's). The weight's own gradient, grad.T @ x, has no fixed operand and stays a plain product.

The packs are made from the weights as they are on entry, so a block must hold one optimizer step's forward and
backward passes and no update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlreason import onednn
from rlreason.rollout.fast_weights import is_sharded


class Packs(NamedTuple):
    """A weight [N, K] packed for x @ W.T (``forward``) and for grad @ W (``backward``), in ``dtype``."""

    forward: torch.Tensor
    backward: torch.Tensor
    dtype: torch.dtype

    def times_transposed(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + bias, in ``dtype``."""
        bias = None if bias is None else bias.to(self.dtype)
        return onednn.linear(x.to(self.dtype), self.forward, bias)

    def times(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W, in ``dtype``."""
        return onednn.linear(grad.to(self.dtype), self.backward)


_open: dict[tuple[int, torch.dtype], Packs] | None = None
"""The packs of the open ``packed_products`` block, by (id of the weight, dtype); None outside one."""

ROWS_HINT = 1024
"""The row count oneDNN is told to expect when packing (any count works; a micro-batch's tokens)."""


def packs_for(weight: torch.Tensor, dtype: torch.dtype) -> Packs | None:
    """The packs of ``weight`` in ``dtype`` inside a ``packed_products`` block (made on first use), else None."""
    if _open is None or not onednn.packs(weight.device, dtype):
        return None
    key = (id(weight), dtype)
    if key not in _open:
        with torch.no_grad():
            plain = weight.detach().to(dtype)
            _open[key] = Packs(
                onednn.pack(plain, ROWS_HINT),
                onednn.pack(plain.t().contiguous(), ROWS_HINT),
                dtype,
            )
    return _open[key]


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a product with ``weight`` runs in here: the CPU autocast dtype when it is on, else the weight's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype


class _PackedLinear(torch.autograd.Function):
    """``F.linear`` whose two products with the weight go through its packs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packs: Packs) -> torch.Tensor:
        x = x.to(packs.dtype)
        ctx.save_for_backward(x if weight.requires_grad else None)
        ctx.packs = packs
        return packs.times_transposed(x, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad = grad.to(ctx.packs.dtype)
        grad_x = ctx.packs.times(grad) if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_weight = flat.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_bias = flat.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _linear_forward(module: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        packs = packs_for(module.weight, _compute_dtype(module.weight))
        if packs is None:
            return F.linear(x, module.weight, module.bias)
        return _PackedLinear.apply(x, module.weight, module.bias, packs)

    return forward


@contextlib.contextmanager
def packed_products(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every ``nn.Linear`` of a CPU ``model`` multiplies through packed weights until the block ends (see the module
    docstring); a no-op for a model elsewhere, sharded (FSDP2), when not ``enabled``, or inside another block."""
    global _open
    first = next(model.parameters(), None)
    if not enabled or _open is not None or first is None or first.device.type != "cpu" or is_sharded(model):
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    _open = {}
    for module in linears:
        module.forward = _linear_forward(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward
        _open = None
