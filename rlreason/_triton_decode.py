"""Fused Triton kernels for the fast engine's decode step on CUDA (rlreason.fast_rollout, ``kernels="triton"``).

A decode step is launch-bound at RL batch sizes: ~30 small PyTorch kernels per layer cost more than reading the
weights. These four kernels bring a layer to nine launches (with the four cuBLAS projections):

- ``add_rms_norm``: residual += delta; h = RMSNorm(residual) * weight                         (2 -> 1 kernels)
- ``rope_and_cache``: (optional q/k RMSNorm,) RoPE on q and k, q scaled by 1/sqrt(D), k and v appended to the
  completion cache at the current slot                                                          (~8 -> 1)
- ``decode_attention``: each row's queries against its group's shared prompt cache, then its own completion
  cache up to the current step (the bound is read on the device: no width buckets), online softmax in float32
                                                                                                (~11 -> 1)
- ``silu_mul``: silu(gate) * up                                                                  (2 -> 1)

Each is checked against the PyTorch path (tests/test_fast_rollout_triton.py, which the Triton interpreter runs on
a CPU: TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, DELTA, W, OUT, N, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = x + tl.load(DELTA + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(X.dtype.element_ty)
        tl.store(X + row * N + cols, x, mask=mask)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / N
    normed = (x * tl.rsqrt(variance + eps)).to(X.dtype.element_ty)  # rounded like transformers' LlamaRMSNorm
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * N + cols, w * normed, mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` (in place) and return RMSNorm(x) * weight; x, delta [R, N] contiguous."""
    R, N = x.shape
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(R,)](x, x if delta is None else delta, weight, out, N, eps, HAS_DELTA=delta is not None,
                               BLOCK=triton.next_power_of_2(N), num_warps=4 if N <= 2048 else 8)
    return out


@triton.jit
def _rope_and_cache_kernel(
    QKV, COS, SIN, POS0, T, QOUT, KC, VC, QNW, KNW, eps, scale, G,
    s_qkv, s_cos, s_kc_p, s_kc_h, s_kc_g, s_kc_s,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
):
    r = tl.program_id(0)
    head = tl.program_id(1)  # 0 .. H + HKV - 1: query heads, then key heads
    t = tl.load(T)
    pos = tl.load(POS0 + r) + t - 1
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    base = QKV + r * s_qkv + head * D
    x = tl.load(base + d).to(tl.float32)
    x_partner = tl.load(base + partner).to(tl.float32)
    if QK_NORM:
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        if head < H:
            w, w_partner = tl.load(QNW + d).to(tl.float32), tl.load(QNW + partner).to(tl.float32)
        else:
            w, w_partner = tl.load(KNW + d).to(tl.float32), tl.load(KNW + partner).to(tl.float32)
        x = (x * inv).to(QKV.dtype.element_ty).to(tl.float32) * w
        x_partner = (x_partner * inv).to(QKV.dtype.element_ty).to(tl.float32) * w_partner
    cos = tl.load(COS + pos * s_cos + d).to(tl.float32)
    sin = tl.load(SIN + pos * s_cos + d).to(tl.float32)  # sin with its first half negated
    y = x * cos + x_partner * sin
    if head < H:
        tl.store(QOUT + (r * H + head) * D + d, (y * scale).to(QOUT.dtype.element_ty))
    else:
        kv_head = head - H
        p = r // G
        g = r % G
        at = p * s_kc_p + kv_head * s_kc_h + g * s_kc_g + (t - 1) * s_kc_s
        tl.store(KC + at + d, y.to(KC.dtype.element_ty))
        v = tl.load(QKV + r * s_qkv + (H + HKV + kv_head) * D + d)
        tl.store(VC + at + d, v)


def rope_and_cache(qkv, cos, sin, pos0, t, kc, vc, q_norm, k_norm, eps, H, Hkv, D, G) -> torch.Tensor:
    """q [R, H, D] (RoPE, times 1/sqrt(D)) from the fused projection ``qkv`` [R, (H + 2 Hkv) D]; writes RoPE'd k and v
    into ``kc``/``vc`` [Pp, Hkv, G, W, D] at slot t - 1."""
    R = qkv.shape[0]
    q = torch.empty(R, H, D, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm is not None
    _rope_and_cache_kernel[(R, H + Hkv)](
        qkv, cos, sin, pos0, t, q, kc, vc, q_norm if norm else qkv, k_norm if norm else qkv, eps, D**-0.5, G,
        qkv.stride(0), cos.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        H=H, HKV=Hkv, D=D, QK_NORM=norm, num_warps=1,
    )
    return q


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # noqa: SIM108  (float32 operands: exact products, not tf32)
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _attend_block(q, k, v, s_bias, m_i, l_i, acc, IEEE: tl.constexpr):
    """One block of keys into the online softmax state (m_i, l_i, acc); ``s_bias`` is 0 or -inf per key."""
    s = _dot(q, tl.trans(k), IEEE) + s_bias[None, :]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    e = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(e, axis=1)
    acc = acc * alpha[:, None] + _dot(e.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _decode_attention_kernel(
    Q, KP, VP, BIAS, KC, VC, T, OUT, G,
    s_kp_p, s_kp_h, s_kp_s, s_bias, s_kc_p, s_kc_h, s_kc_g, s_kc_s,
    H: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    Wp: tl.constexpr, IEEE: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)  # kv head
    p = r // G
    g = r % G
    t = tl.load(T)  # completion slots 0 .. t - 1 are filled
    m = tl.arange(0, REP_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + (r * H + h * REP + m[:, None]) * D + d[None, :], mask=m[:, None] < REP, other=0.0)
    m_i = tl.full([REP_PAD], -1.0e30, tl.float32)  # finite: a block with every key masked leaves the state as is
    l_i = tl.zeros([REP_PAD], tl.float32)
    acc = tl.zeros([REP_PAD, D], tl.float32)
    kp = KP + p * s_kp_p + h * s_kp_h
    vp = VP + p * s_kp_p + h * s_kp_h
    for start in tl.range(0, Wp, BLOCK_N):  # the group's prompt, shared by its rows
        cols = start + n
        inside = cols < Wp
        k = tl.load(kp + cols[:, None] * s_kp_s + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(vp + cols[:, None] * s_kp_s + d[None, :], mask=inside[:, None], other=0.0)
        bias = tl.load(BIAS + p * s_bias + cols, mask=inside, other=float("-inf"))
        m_i, l_i, acc = _attend_block(q, k, v, bias, m_i, l_i, acc, IEEE)
    kc = KC + p * s_kc_p + h * s_kc_h + g * s_kc_g
    vc = VC + p * s_kc_p + h * s_kc_h + g * s_kc_g
    for start in tl.range(0, t, BLOCK_N):  # this row's own completion so far (t read on the device)
        cols = start + n
        inside = cols < t
        k = tl.load(kc + cols[:, None] * s_kc_s + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(vc + cols[:, None] * s_kc_s + d[None, :], mask=inside[:, None], other=0.0)
        bias = tl.where(inside, 0.0, float("-inf"))
        m_i, l_i, acc = _attend_block(q, k, v, bias, m_i, l_i, acc, IEEE)
    out = acc / l_i[:, None]
    tl.store(OUT + (r * H + h * REP + m[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty), mask=m[:, None] < REP)


ATTENTION_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 2}
"""The decode attention kernel's tile and launch shape (benchmarks/decode_kernels.py times the alternatives)."""


def decode_attention(q, kp, vp, bias, kc, vc, t, G: int, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """[R, H * D]: q [R, H, D] (pre-scaled) attends its group's prompt kp/vp [Pp, Hkv, Wp, D] (``bias`` [Pp, Wp]:
    0 or -inf) and its own completion kc/vc [Pp, Hkv, G, W, D] up to slot t - 1."""
    R, H, D = q.shape
    Hkv, Wp = kp.shape[1], kp.shape[2]
    rep = H // Hkv
    out = torch.empty(R, H * D, dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(R, Hkv)](
        q, kp, vp, bias, kc, vc, t, out, G,
        kp.stride(0), kp.stride(1), kp.stride(2), bias.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        H=H, REP=rep, REP_PAD=max(16, triton.next_power_of_2(rep)), D=D, Wp=Wp, IEEE=q.dtype == torch.float32,
        BLOCK_N=block_n or ATTENTION_LAUNCH["block_n"], num_warps=num_warps or ATTENTION_LAUNCH["num_warps"],
        num_stages=num_stages or ATTENTION_LAUNCH["num_stages"],
    )
    return out


@triton.jit
def _silu_mul_kernel(GU, OUT, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(GU + row * 2 * N + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * 2 * N + N + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(GU.dtype.element_ty)  # silu rounded to the dtype, as F.silu returns it
    tl.store(OUT + row * N + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused projection ``gate_up`` [R, 2 I] -> [R, I]."""
    R, N2 = gate_up.shape
    N = N2 // 2
    out = torch.empty(R, N, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(R, triton.cdiv(N, block))](gate_up, out, N, BLOCK=block, num_warps=4)
    return out
