"""The fast engine's arithmetic in PyTorch ops: the prefill, the seeded draw and the decode step of ``kernels="torch"``.

The prefill and the draw serve the Triton step too (rlreason.rollout.fast_triton_step), which replaces only the decode
step's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from rlreason.rollout import sampling as seeded
from rlreason.rollout.engine import SamplingParams
from rlreason.rollout.fast_weights import EngineWeights
from rlreason.rollout.fast_workspace import ModelDims, StepShape, Workspace


class TorchOps:
    """The decoder's numerics shared by prefill and decode, in the compute ``dtype`` on ``device``."""

    def __init__(self, model: PreTrainedModel, dims: ModelDims, dtype: torch.dtype, eos: torch.Tensor):
        self.rotary_emb = model.model.rotary_emb
        self.dims, self.dtype, self.eos = dims, dtype, eos
        self.device = eos.device
        cuda = self.device.type == "cuda"
        self.fused_norm = cuda
        # On the CPU attention runs in float32 from a float32 cache: a bf16 product there copies its strided
        # operands (the cache's slices) before multiplying, and rounds the scores to bf16 on the way out.
        self.kv_dtype = dtype if cuda else torch.float32
        self._scores_out_dtype = cuda and dtype in (torch.bfloat16, torch.float16) and self._bmm_out_dtype_works()
        scale = [dims.head_dim**-0.5] * dims.num_heads + [1.0] * dims.num_kv_heads  # queries carry 1/sqrt(D)
        self.qk_scale = torch.tensor(scale, dtype=dtype, device=self.device).view(1, -1, 1)

    def _bmm_out_dtype_works(self) -> bool:
        try:  # shaped like the decode step's use: a strided, transposed right operand
            a = torch.ones(3, 5, 16, dtype=self.dtype, device=self.device)
            b = torch.ones(3, 8, 2, 16, dtype=self.dtype, device=self.device)[:, :, 0].transpose(1, 2)
            out = torch.bmm(a, b, out_dtype=torch.float32)
            return out.dtype == torch.float32 and bool((out == 16).all())
        except (RuntimeError, TypeError):
            return False

    # ------------------------------------------------------------------ numerics shared by prefill and decode

    def scores(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b for 3-d tensors, in float32 (bf16 operands accumulate and round in float32, like flash attention)."""
        if self._scores_out_dtype:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a, b).float()

    def rms(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The Llama RMSNorm: normalise in float32, back to the input dtype, times the weight (None: folded into the
        next projection); on CUDA torch's fused kernel, which rounds once instead of twice."""
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), weight, self.dims.eps)
        normed = x.float()
        normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.dims.eps)).to(x.dtype)
        return normed if weight is None else weight * normed

    def project(self, h: torch.Tensor, layer: dict, weights: EngineWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        linear = weights.linear
        if "qkv" in layer:
            d = self.dims
            q_size, kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
            return linear(h, layer["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
        return linear(h, layer["q"]), linear(h, layer["k"]), linear(h, layer["v"])

    @staticmethod
    def mlp(h: torch.Tensor, layer: dict, weights: EngineWeights) -> torch.Tensor:
        linear = weights.linear
        if "gate_up" in layer:
            gate, up = linear(h, layer["gate_up"]).chunk(2, dim=-1)
        else:
            gate, up = linear(h, layer["gate"]), linear(h, layer["up"])
        return linear(F.silu(gate) * up, layer["down"])

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """RoPE: x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x, half) (sin with its first half negated)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [length, head_dim] from the model's own rotary embedding (any static RoPE scaling)."""
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.rotary_emb(probe, positions)
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ------------------------------------------------------------------ prefill: each prompt once

    def prefill(
        self, ws: Workspace, weights: EngineWeights, ids: torch.Tensor, mask: torch.Tensor, shared: int = 0
    ) -> torch.Tensor:
        """Run the P prompts, fill the prompt cache, return the last position's logits [P, V] (float32).

        The first ``shared`` columns are the same tokens in every row (the prompts' common prefix: a system prompt)
        and are computed once; the rest of each prompt is left-padded after them and attends that one copy."""
        P, W = ids.shape
        S = W - shared
        H, Hkv, D = self.dims.num_heads, self.dims.num_kv_heads, self.dims.head_dim
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = ws.cos[positions].unsqueeze(1), ws.sin[positions].unsqueeze(1)  # [P, 1, W, D]
        cos_pre, sin_pre, cos, sin = cos[:1, :, :shared], sin[:1, :, :shared], cos[:, :, shared:], sin[:, :, shared:]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        # a padding query attends itself only, so no row of the mask is empty (an empty row gives NaN)
        own = (causal & mask.bool()[:, None, shared:]) | torch.eye(S, dtype=torch.bool, device=self.device)
        allowed = torch.cat([own.new_ones(P, S, shared), own], dim=2).unsqueeze(1)  # [P, 1, S, shared + S]
        x = F.embedding(torch.cat([ids[0, :shared], ids[:, shared:].flatten()]), weights.embed)  # prefix, then rows
        for i, layer in enumerate(weights.layers):
            q, k, v = self.project(self.rms(x, layer["ln1"]), layer, weights)
            qs, ks, vs = (t[shared:].view(P, S, h, D).transpose(1, 2) for t, h in ((q, H), (k, Hkv), (v, Hkv)))
            qp, kp, vp = (t[:shared].view(1, shared, h, D).transpose(1, 2) for t, h in ((q, H), (k, Hkv), (v, Hkv)))
            if layer["q_norm"] is not None:
                qs, ks = self.rms(qs, layer["q_norm"]), self.rms(ks, layer["k_norm"])
                qp, kp = self.rms(qp, layer["q_norm"]), self.rms(kp, layer["k_norm"])
            qs, ks, qp, kp = self.rotate(qs, cos, sin), self.rotate(ks, cos, sin), self.rotate(qp, cos_pre, sin_pre), self.rotate(kp, cos_pre, sin_pre)
            ws.kp[i, :, :, :shared].copy_(kp.expand(P, -1, -1, -1))
            ws.vp[i, :, :, :shared].copy_(vp.expand(P, -1, -1, -1))
            ws.kp[i, :, :, shared:W].copy_(ks)
            ws.vp[i, :, :, shared:W].copy_(vs)
            keys, values = torch.cat([kp.expand(P, -1, -1, -1), ks], dim=2), torch.cat([vp.expand(P, -1, -1, -1), vs], dim=2)
            if Hkv != H:
                keys, values = keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1)
                kp, vp = kp.repeat_interleave(H // Hkv, dim=1), vp.repeat_interleave(H // Hkv, dim=1)
            rows = F.scaled_dot_product_attention(qs, keys, values, attn_mask=allowed).transpose(1, 2).reshape(P * S, H * D)
            if shared:
                prefix = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True).transpose(1, 2).reshape(shared, H * D)
                rows = torch.cat([prefix, rows])
            x = x + weights.linear(rows, layer["o"])
            x = x + self.mlp(self.rms(x, layer["ln2"]), layer, weights)
        last = self.rms(x[shared:].view(P, S, x.shape[-1])[:, -1], weights.norm)
        return weights.linear(last, weights.lm_head).float()

    # ------------------------------------------------------------------ sampling

    def sample(
        self, logits: torch.Tensor, seeds: torch.Tensor, t: torch.Tensor, sampling: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its log-probability at the sampling temperature, for each row of float32 ``logits``: the draw
        of ``rlreason.rollout.sampling.sample`` (what HFEngine uses), with the position ``t`` a tensor for CUDA graphs."""
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logprobs = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        if sampling.min_new_tokens > 0:  # only the EOS columns are touched, in place (the logits are the step's own)
            held = torch.where(t < sampling.min_new_tokens, float("-inf"), logits.index_select(-1, self.eos))
            logits.index_copy_(-1, self.eos, held)
        if sampling.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = seeded.sample(logits, seeds, t, temperature, sampling.top_p, sampling.top_k)
        return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def record(self, ws: Workspace, R: int, logits: torch.Tensor, sampling: SamplingParams) -> None:
        """Sample from the step's logits (any float dtype) and write the token, its log-prob and the row's state."""
        t = ws.t
        tokens, logprobs = self.sample(logits.float(), ws.seeds[:R], t, sampling)
        rows = ws.row_ids[:R]
        column = t.expand(R)
        ws.out_tokens.index_put_((rows, column), tokens)
        ws.out_logprobs.index_put_((rows, column), logprobs)
        ws.tokens[:R].copy_(tokens)
        ws.done[:R] |= torch.isin(tokens, self.eos)
        ws.t.add_(1)

    # ------------------------------------------------------------------ one decode step

    def step(self, ws: Workspace, weights: EngineWeights, shape: StepShape, sampling: SamplingParams) -> None:
        """Feed each row's last token, append its keys/values, sample the next token; all on the device."""
        R, Pp, G, B = shape.rows, shape.prompts, shape.group, shape.width
        H, Hkv, D = self.dims.num_heads, self.dims.num_kv_heads, self.dims.head_dim
        rep = H // Hkv
        if shape.compacted:
            rc = ws.rows_cache
            kp, vp, kc, vc, bias_p = rc["kp"], rc["vp"], rc["kc"], rc["vc"], rc["bias"][:Pp]
        else:
            kp, vp, kc, vc, bias_p = ws.kp, ws.vp, ws.kc, ws.vc, ws.bias_p
        Wp = kp.shape[3]
        t = ws.t
        pos = ws.pos0[:R] + (t - 1)
        # RoPE of queries and keys in one go ([R, H + Hkv, D]), the queries' tables scaled by 1/sqrt(D)
        cos, sin = ws.cos[pos].unsqueeze(1) * self.qk_scale, ws.sin[pos].unsqueeze(1) * self.qk_scale
        slot = (t - 1).view(1)
        visible = torch.arange(B, device=self.device) < t
        comp_bias = torch.zeros(B, device=self.device).masked_fill(~visible, float("-inf"))
        bias = torch.cat([bias_p[:Pp].view(Pp, 1, 1, 1, Wp), comp_bias.view(1, 1, 1, 1, B).expand(Pp, 1, 1, 1, B)], dim=-1)
        x = F.embedding(ws.tokens[:R], weights.embed)  # [R, hidden]
        for i, layer in enumerate(weights.layers):
            h = self.rms(x, layer["ln1"])
            if "qkv" in layer:  # q and k are neighbours in the fused projection: one RoPE for both
                qkv = weights.linear(h, layer["qkv"])
                qk, v = qkv[:, : (H + Hkv) * D].view(R, H + Hkv, D), qkv[:, (H + Hkv) * D :].view(R, Hkv, D)
            else:
                q, k, v = self.project(h, layer, weights)
                qk, v = torch.cat([q.view(R, H, D), k.view(R, Hkv, D)], dim=1), v.view(R, Hkv, D)
            if layer["q_norm"] is not None:
                qk = torch.cat([self.rms(qk[:, :H], layer["q_norm"]), self.rms(qk[:, H:], layer["k_norm"])], dim=1)
            qk = self.rotate(qk, cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            # append to the cache: rows are (group, member) -> layout [Pp, Hkv, G, slot, D]
            kc_i, vc_i = kc[i, :Pp], vc[i, :Pp]
            kc_i.index_copy_(3, slot, k.view(Pp, G, Hkv, 1, D).transpose(1, 2).to(self.kv_dtype))
            vc_i.index_copy_(3, slot, v.view(Pp, G, Hkv, 1, D).transpose(1, 2).to(self.kv_dtype))
            # queries grouped by prompt and kv head: [Pp, Hkv, G, rep, D]
            qg = _contiguous_in(q.view(Pp, G, Hkv, rep, D).transpose(1, 2), self.kv_dtype)
            s_p = self.scores(qg.view(Pp * Hkv, G * rep, D), kp[i, :Pp].reshape(Pp * Hkv, Wp, D).transpose(1, 2))
            s_c = self.scores(qg.view(Pp * Hkv * G, rep, D), kc_i[..., :B, :].reshape(Pp * Hkv * G, B, D).transpose(1, 2))
            s = torch.cat([s_p.view(Pp, Hkv, G, rep, Wp), s_c.view(Pp, Hkv, G, rep, B)], dim=-1) + bias
            p = torch.softmax(s, dim=-1).to(self.kv_dtype)
            o = torch.bmm(p[..., :Wp].reshape(Pp * Hkv, G * rep, Wp), vp[i, :Pp].reshape(Pp * Hkv, Wp, D)).view(Pp, Hkv, G, rep, D)
            o = o + torch.bmm(p[..., Wp:].reshape(Pp * Hkv * G, rep, B), vc_i[..., :B, :].reshape(Pp * Hkv * G, B, D)).view(Pp, Hkv, G, rep, D)
            o = _contiguous_in(o.transpose(1, 2), self.dtype).view(R, H * D)
            x = x + weights.linear(o, layer["o"])
            x = x + self.mlp(self.rms(x, layer["ln2"]), layer, weights)
        self.record(ws, R, weights.linear(self.rms(x, weights.norm), weights.lm_head), sampling)


def _contiguous_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``x`` in ``dtype``, in one pass (``to`` alone keeps a new dtype's strides, and returns
    ``x`` itself in its own dtype)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)
