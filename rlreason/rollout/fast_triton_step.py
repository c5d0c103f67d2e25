"""The fast engine's decode step with the kernels of rlreason.rollout.triton_decode (``kernels="triton"``, CUDA).

Seven launches a layer: the norms are folded into the weights (``EngineWeights(fold_norms=True)``; their 1/rms
scale applied by the kernels after each projection), and the output projections add into the residual stream
themselves. Its attention reads the step number from the device, so the step's shape has no cache width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlreason.rollout.engine import SamplingParams
from rlreason.rollout.fast_ops import TorchOps
from rlreason.rollout.fast_weights import EngineWeights
from rlreason.rollout.fast_workspace import StepShape, Workspace


class TritonStep:
    """One decode step in Triton kernels; sampling other than plain temperature falls back to ``ops.record``."""

    def __init__(self, ops: TorchOps):
        from rlreason.rollout import triton_decode

        self.kernels, self.ops = triton_decode, ops

    def step(self, ws: Workspace, weights: EngineWeights, shape: StepShape, sampling: SamplingParams) -> None:
        K, W, dims, Pp, G = self.kernels, weights, self.ops.dims, shape.prompts, shape.group
        H, Hkv, D, eps = dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.eps
        if shape.compacted:
            rc = ws.rows_cache
            kp, vp, kc, vc, bias = rc["kp"], rc["vp"], rc["kc"], rc["vc"], rc["bias"]
        else:
            kp, vp, kc, vc, bias = ws.kp, ws.vp, ws.kc, ws.vc, ws.bias_p
        x = F.embedding(ws.tokens[: shape.rows], W.embed)
        for i, layer in enumerate(W.layers):
            qkv_w, qkv_b = layer["qkv"]
            q = K.rope_and_cache(F.linear(x, qkv_w), x, qkv_b, ws.cos, ws.sin, ws.pos0, ws.t, kc[i, :Pp], vc[i, :Pp],
                                 layer["q_norm"], layer["k_norm"], eps, H, Hkv, D, G)
            attn = K.decode_attention(q, kp[i, :Pp], vp[i, :Pp], bias[:Pp], kc[i, :Pp], vc[i, :Pp], ws.t, G)
            self._add_projection(x, attn, layer["o"])
            gate_up_w, gate_up_b = layer["gate_up"]
            self._add_projection(x, K.silu_mul(F.linear(x, gate_up_w), x, gate_up_b, eps), layer["down"])
        self._record(ws, shape.rows, F.linear(K.rms_norm(x, W.norm, eps), *W.lm_head), sampling)

    @staticmethod
    def _add_projection(x: torch.Tensor, h: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """x += h @ weight.T (+ bias), the addition done by the matrix multiply itself."""
        weight, bias = projection
        x.addmm_(h, weight.t())
        if bias is not None:
            x.add_(bias)

    def _record(self, ws: Workspace, R: int, logits: torch.Tensor, sampling: SamplingParams) -> None:
        """Plain temperature sampling in two fused launches; anything else by ``TorchOps.record``."""
        if sampling.greedy or sampling.top_k or sampling.top_p != 1.0:
            self.ops.record(ws, R, logits, sampling)
            return
        t = ws.t
        self.kernels.sample_and_record(
            logits, sampling.temperature, sampling.min_new_tokens, self.ops.eos, ws.seeds[:R], t, ws.row_ids[:R],
            ws.out_tokens, ws.out_logprobs, ws.tokens[:R], ws.done[:R],
        )
        t.add_(1)
