"""Fused Triton kernels for the fast engine's decode step on CUDA (rlreason.rollout.fast, ``kernels="triton"``).

A decode step is launch-bound at RL batch sizes: ~30 small PyTorch kernels per layer cost more than reading the
weights. With these kernels a layer is seven launches: the four cuBLAS projections and three kernels here. Each
RMSNorm's weight is folded into the projection after it (``EngineWeights(fold_norms=True)``), so a norm reduces to one
scale per row, ``1 / rms(x)``, which the kernel reading that projection's output applies; the residual additions
happen in the output projections themselves (``x.addmm_``). No launch is left for the norms or the residual.

- ``rope_and_cache``: the 1/rms(x) scale (and bias), the optional q/k RMSNorm, RoPE on q and k, q scaled by
  1/sqrt(D), k and v appended to the completion cache at the current slot
- ``decode_attention``: each row's queries against its group's shared prompt cache, then its own completion
  cache up to the current step (the bound is read on the device: no width buckets), online softmax in float32
- ``silu_mul``: the 1/rms(x) scale (and bias), silu(gate) * up
- ``sample_and_record``: in two launches, the draw of ``rlreason.rollout.sampling.sample`` (temperature, the
  per-completion uniform, the two-level inverse CDF over its blocks, the EOS ban of ``min_new_tokens``), the
  token's log-probability, and the step's bookkeeping (output token and log-prob, next input, finished rows),
  which PyTorch ops spread over many small launches a step (benchmarks/decode_kernels.py times both)
- ``rms_norm``: the final norm before the head

Each is checked against plain PyTorch (benchmarks/gpu_triton_checks.py, which also runs on a CPU under Triton's
interpreter: TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlreason.rollout.sampling import DRAW_BLOCK


@triton.jit
def _inv_rms(X, row, N, eps, BLOCK_X: tl.constexpr):
    """1 / rms of row ``row`` of X [*, N] (float32): the RMSNorm scale that the folded weights leave out."""
    cols = tl.arange(0, BLOCK_X)
    x = tl.load(X + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)


@triton.jit
def _rms_norm_kernel(X, W, OUT, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * _inv_rms(X, row, N, eps, BLOCK)).to(X.dtype.element_ty)  # rounded like LlamaRMSNorm
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * N + cols, w * normed, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight for x [R, N] contiguous."""
    R, N = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(R,)](x, weight, out, N, eps, BLOCK=triton.next_power_of_2(N), num_warps=4 if N <= 2048 else 8)
    return out


@triton.jit
def _rope_and_cache_kernel(
    QKV, X, BIAS, COS, SIN, POS0, T, QOUT, KC, VC, QNW, KNW, eps, scale, G, N,
    s_qkv, s_cos, s_kc_p, s_kc_h, s_kc_g, s_kc_s,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_X: tl.constexpr, HEADS: tl.constexpr,
):
    r = tl.program_id(0)  # one row, all its heads: query heads, key heads, value heads (a tile [HEADS, D])
    t = tl.load(T)
    head = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, D)[None, :]
    partner = (d + D // 2) % D  # rotate_half(x)[d] = -+x[partner[d]]; the sign is in SIN
    real = head < H + 2 * HKV
    is_q = head < H
    is_v = (head >= H + HKV) & real
    is_k = (head >= H) & (head < H + HKV)
    inv = _inv_rms(X, r, N, eps, BLOCK_X)
    x = tl.load(QKV + r * s_qkv + head * D + d, mask=real, other=0.0).to(tl.float32) * inv
    x_partner = tl.load(QKV + r * s_qkv + head * D + partner, mask=real, other=0.0).to(tl.float32) * inv
    if HAS_BIAS:
        x += tl.load(BIAS + head * D + d, mask=real, other=0.0).to(tl.float32)
        x_partner += tl.load(BIAS + head * D + partner, mask=real, other=0.0).to(tl.float32)
    # rounded where the unfused projection's output is
    x = x.to(QKV.dtype.element_ty).to(tl.float32)
    x_partner = x_partner.to(QKV.dtype.element_ty).to(tl.float32)
    slot = (r // G) * s_kc_p + (r % G) * s_kc_g + (t - 1) * s_kc_s
    tl.store(VC + slot + (head - H - HKV) * s_kc_h + d, x.to(VC.dtype.element_ty), mask=is_v)
    if QK_NORM:
        head_inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.where(is_q, tl.load(QNW + d).to(tl.float32), tl.load(KNW + d).to(tl.float32))
        w_partner = tl.where(is_q, tl.load(QNW + partner).to(tl.float32), tl.load(KNW + partner).to(tl.float32))
        x = (x * head_inv).to(QKV.dtype.element_ty).to(tl.float32) * w
        x_partner = (x_partner * head_inv).to(QKV.dtype.element_ty).to(tl.float32) * w_partner
    pos = tl.load(POS0 + r) + t - 1
    cos = tl.load(COS + pos * s_cos + d).to(tl.float32)
    sin = tl.load(SIN + pos * s_cos + d).to(tl.float32)  # sin with its first half negated
    y = x * cos + x_partner * sin
    tl.store(QOUT + (r * H + head) * D + d, (y * scale).to(QOUT.dtype.element_ty), mask=is_q)
    tl.store(KC + slot + (head - H) * s_kc_h + d, y.to(KC.dtype.element_ty), mask=is_k)


def rope_and_cache(qkv, x, bias, cos, sin, pos0, t, kc, vc, q_norm, k_norm, eps, H, Hkv, D, G) -> torch.Tensor:
    """q [R, H, D] (RoPE, times 1/sqrt(D)) from ``qkv`` [R, (H + 2 Hkv) D] = x @ (norm-folded weights).T: scaled by
    1/rms(x) (x [R, hidden], the residual stream), plus ``bias``; writes RoPE'd k and v into ``kc``/``vc``
    [Pp, Hkv, G, W, D] at slot t - 1. One program a row: its 1/rms is computed once for all its heads."""
    R, N = x.shape
    q = torch.empty(R, H, D, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm is not None
    heads = triton.next_power_of_2(H + 2 * Hkv)
    _rope_and_cache_kernel[(R,)](
        qkv, x, bias if bias is not None else qkv, cos, sin, pos0, t, q, kc, vc, q_norm if norm else qkv,
        k_norm if norm else qkv, eps, D**-0.5, G, N,
        qkv.stride(0), cos.stride(0), kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        H=H, HKV=Hkv, D=D, QK_NORM=norm, HAS_BIAS=bias is not None, BLOCK_X=triton.next_power_of_2(N), HEADS=heads,
        num_warps=4 if heads * D <= 2048 else 8,
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
def _silu_mul_kernel(GU, X, BIAS, OUT, N, NX, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_X: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    inv = _inv_rms(X, row, NX, eps, BLOCK_X)
    gate = tl.load(GU + row * 2 * N + cols, mask=mask, other=0.0).to(tl.float32) * inv
    up = tl.load(GU + row * 2 * N + N + cols, mask=mask, other=0.0).to(tl.float32) * inv
    if HAS_BIAS:
        gate += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(BIAS + N + cols, mask=mask, other=0.0).to(tl.float32)
    gate = gate.to(GU.dtype.element_ty).to(tl.float32)  # rounded where the unfused projection's output is
    up = up.to(GU.dtype.element_ty)
    act = (gate / (1.0 + tl.exp(-gate))).to(GU.dtype.element_ty)  # silu rounded to the dtype, as F.silu returns it
    tl.store(OUT + row * N + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """silu(gate) * up [R, I] from ``gate_up`` [R, 2 I] = x @ (norm-folded weights).T, scaled by 1/rms(x) (x [R, hidden],
    the residual stream), plus ``bias``."""
    R, N2 = gate_up.shape
    N = N2 // 2
    out = torch.empty(R, N, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(R, triton.cdiv(N, block))](
        gate_up, x, bias if bias is not None else gate_up, out, N, x.shape[1], eps, HAS_BIAS=bias is not None,
        BLOCK=block, BLOCK_X=triton.next_power_of_2(x.shape[1]), num_warps=4,
    )
    return out


@triton.jit
def _banned(cols, t, min_new, EOS, n_eos):
    """Which of ``cols`` are end-of-sequence tokens while ``min_new_tokens`` holds them back."""
    banned = cols < 0
    if t < min_new:
        for j in range(n_eos):
            banned = banned | (cols == tl.load(EOS + j))
    return banned


@triton.jit
def _sample_blocks_kernel(LOGITS, s_logits, T, EOS, n_eos, min_new, temperature, V, STATS, NB, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(LOGITS + r * s_logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
    m = tl.max(x, axis=0)  # every block holds a real column
    s = tl.sum(tl.exp(x - m), axis=0)
    held = tl.where(_banned(cols, tl.load(T), min_new, EOS, n_eos), float("-inf"), x)
    m_held = tl.max(held, axis=0)
    mass = tl.sum(tl.where(held == float("-inf"), 0.0, tl.exp(held - m_held)).to(tl.float64), axis=0)
    at = STATS + r * 4 * NB + b
    tl.store(at, m.to(tl.float64))
    tl.store(at + NB, s.to(tl.float64))
    tl.store(at + 2 * NB, m_held.to(tl.float64))
    tl.store(at + 3 * NB, mass)


@triton.jit
def _mix(x):
    """rlreason.rollout.sampling._mix on int64 (wrapping multiply; logical shifts done with masks)."""
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * -7046029254386353131
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    x = x * -4658895280553007687
    return x ^ ((x >> 32) & ((1 << 32) - 1))


@triton.jit
def _sample_pick_kernel(
    LOGITS, s_logits, STATS, NB, SEEDS, T, EOS, n_eos, min_new, temperature, V,
    ROW_IDS, OUT_TOKENS, OUT_LOGPROBS, s_out, TOKENS, DONE,
    BLOCK: tl.constexpr, NB_PAD: tl.constexpr,
):
    r = tl.program_id(0)
    t = tl.load(T)
    j = tl.arange(0, NB_PAD)
    real = j < NB
    at = STATS + r * 4 * NB + j
    m = tl.load(at, mask=real, other=float("-inf"))
    s = tl.load(at + NB, mask=real, other=0.0)
    m_held = tl.load(at + 2 * NB, mask=real, other=float("-inf"))
    mass = tl.load(at + 3 * NB, mask=real, other=0.0)
    # the log-softmax's normaliser over all blocks (before the EOS ban, like the recorded log-probs of the torch path)
    top = tl.max(m, axis=0)
    log_total = tl.log(tl.sum(s * tl.exp((m - top).to(tl.float32)).to(tl.float64), axis=0).to(tl.float32))
    # sampling.draw: block masses on one scale, their float64 CDF, the block the row's uniform falls in
    top_held = tl.max(m_held, axis=0)
    mass = mass * tl.exp((m_held - top_held).to(tl.float32)).to(tl.float64)
    cdf = tl.cumsum(mass, axis=0)
    seed = tl.load(SEEDS + r)
    bits = _mix(_mix(seed) + t * 0x2545F4914F6CDD1D)
    u = (((bits >> 11) & ((1 << 53) - 1)).to(tl.float64) + 0.5) / 9007199254740992.0  # sampling.uniforms
    target = u * tl.max(cdf, axis=0)
    block = tl.minimum(tl.sum((cdf <= target).to(tl.int32), axis=0), NB - 1)
    before = tl.sum(tl.where(j == block, cdf - mass, 0.0), axis=0)
    rest = tl.maximum(target - before, 0.0)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(LOGITS + r * s_logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
    held = tl.where(_banned(cols, t, min_new, EOS, n_eos), float("-inf"), x)
    inside = tl.cumsum(tl.where(held == float("-inf"), 0.0, tl.exp(held - top_held.to(tl.float32))).to(tl.float64), axis=0)
    last = tl.sum((inside < tl.max(inside, axis=0)).to(tl.int32), axis=0)  # rounding may put rest past the block
    token = block * BLOCK + tl.minimum(tl.sum((inside <= rest).to(tl.int32), axis=0), last)
    chosen = tl.load(LOGITS + r * s_logits + token).to(tl.float32) / temperature
    logprob = chosen - top.to(tl.float32) - log_total
    row = tl.load(ROW_IDS + r)
    tl.store(OUT_TOKENS + row * s_out + t, token.to(tl.int64))
    tl.store(OUT_LOGPROBS + row * s_out + t, logprob)
    tl.store(TOKENS + r, token.to(tl.int64))
    ended = tl.load(DONE + r)
    for k in range(n_eos):
        ended = ended | (token == tl.load(EOS + k))
    tl.store(DONE + r, ended)


def sample_and_record(logits, temperature: float, min_new_tokens: int, eos, seeds, t, row_ids, out_tokens,
                      out_logprobs, tokens, done) -> None:
    """One decode step's draw and bookkeeping for ``logits`` [R, V] (any float dtype): row r's token is
    ``rlreason.rollout.sampling.sample`` at ``temperature`` (no top-k/top-p) with its seed and position ``t`` (0-d, on the
    device), EOS banned while t < ``min_new_tokens``; its log-probability is at the temperature before the ban. Writes
    ``out_tokens`` and ``out_logprobs`` [*, W] at (row_ids[r], t), ``tokens[r]``, and ``done[r] |= token is EOS``."""
    R, V = logits.shape
    blocks = triton.cdiv(V, DRAW_BLOCK)
    stats = torch.empty(R, 4, blocks, dtype=torch.float64, device=logits.device)
    _sample_blocks_kernel[(R, blocks)](
        logits, logits.stride(0), t, eos, eos.numel(), min_new_tokens, temperature, V, stats, blocks,
        BLOCK=DRAW_BLOCK, num_warps=4,
    )
    _sample_pick_kernel[(R,)](
        logits, logits.stride(0), stats, blocks, seeds, t, eos, eos.numel(), min_new_tokens, temperature, V,
        row_ids, out_tokens, out_logprobs, out_tokens.stride(0), tokens, done,
        BLOCK=DRAW_BLOCK, NB_PAD=triton.next_power_of_2(blocks), num_warps=4,
    )
