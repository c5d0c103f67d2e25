"""Every decoder layer of a decode step in one persistent Triton launch (rlreason.rollout.fast, CUDA).

At RL batch sizes a decode step is bound by kernel boundaries, not by bytes: the seven launches a layer of
rlreason.rollout.triton_decode each cost a few microseconds of launch, ramp and tail, more than their weights take
to read. Here one program per multiprocessor walks all layers; between the five stages of a layer (the q/k/v
product; RoPE, the cache write and attention; the output product; the gate/up product with SiLU; the down product)
the programs meet at a grid barrier, a counter in device memory. Each stage's work is split into tiles that the
programs take in turn. The numerics are those of the seven-launch step: norm-folded weights with 1/rms(x) applied
to each product's output (rounded where a separate product's output is), float32 accumulation, the residual
added once in float32 and rounded.

``STAGE`` > 0 runs a single stage of a single layer and no barrier: how Triton's interpreter (which runs programs
one after another, so a barrier would never open) checks the same code on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlreason.rollout.triton_decode import _attend, _dot

STAGES = tl.constexpr(5)  # the stages of a layer, between which the programs meet
COUNTERS = tl.constexpr(8)
TILES = {"block_m": 64, "block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 3}
"""The products' tile and launch shape (benchmarks/decode_kernels.py --layers times the alternatives)."""


@triton.jit
def _grid_barrier(COUNTER, target):
    """Wait until every program has arrived ``target`` / num_programs times; a program's earlier writes are
    visible to every program after it (release on arrival, acquire while waiting)."""
    tl.debug_barrier()
    # arrivals spread over COUNTERS counters, a cache line each, so they do not queue at one atomic unit
    tl.atomic_add(COUNTER + (tl.program_id(0) % COUNTERS) * 32, 1, sem="release", scope="gpu")
    lines = COUNTER + tl.arange(0, COUNTERS) * 32
    while tl.sum(tl.load(lines, volatile=True), axis=0) < target:  # plain reads while waiting
        pass
    tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _products(A, s_a, W, s_w, W2, m0, n0, M, N, K,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr, IEEE: tl.constexpr):
    """acc = A[m0:m0+BM] @ W[n0:n0+BN].T in float32 (and the same with W2 when ``TWO``), and the rows' sums of
    squares of A (for the 1/rms of a norm-folded product). A is read past the L1: other programs wrote it."""
    rm = m0 + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    acc2 = tl.zeros([BM, BN], tl.float32)
    ss = tl.zeros([BM], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * s_a + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0,
                    cache_modifier=".cg")
        w_mask = (rn[:, None] < N) & (kk[None, :] < K)
        w = tl.load(W + rn[:, None] * s_w + kk[None, :], mask=w_mask, other=0.0)
        af = a.to(tl.float32)
        ss += tl.sum(af * af, axis=1)
        acc += _dot(a, tl.trans(w), IEEE)
        if TWO:
            w2 = tl.load(W2 + rn[:, None] * s_w + kk[None, :], mask=w_mask, other=0.0)
            acc2 += _dot(a, tl.trans(w2), IEEE)
    return acc, acc2, ss


@triton.jit
def _scaled(acc, ss, K, eps, dtype: tl.constexpr):
    """A norm-folded product's output: rounded to the dtype (as a separate product returns it), times 1/rms of its
    input's rows, rounded again (as the kernel reading that product rounds it)."""
    inv = tl.rsqrt(ss / K + eps)
    return (acc.to(dtype).to(tl.float32) * inv[:, None]).to(dtype)


@triton.jit
def _qkv_stage(X, W, QKV, R, eps, pid, NP, E: tl.constexpr, NQKV: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    tiles_n = tl.cdiv(NQKV, BN)
    for tile in range(pid, tl.cdiv(R, BM) * tiles_n, NP):
        m0, n0 = (tile // tiles_n) * BM, (tile % tiles_n) * BN
        acc, _, ss = _products(X, E, W, E, W, m0, n0, R, NQKV, E, BM, BN, BK, False, IEEE)
        rm, rn = m0 + tl.arange(0, BM), n0 + tl.arange(0, BN)
        tl.store(QKV + rm[:, None] * NQKV + rn[None, :], _scaled(acc, ss, E, eps, QKV.dtype.element_ty),
                 mask=(rm[:, None] < R) & (rn[None, :] < NQKV))


@triton.jit
def _attention_stage(QKV, ATT, KP, VP, BIAS, KC, VC, COS, SIN, POS0, t, R, G, scale, pid, NP,
                     s_kp_p, s_kp_h, s_kp_s, s_bias, s_kc_p, s_kc_h, s_kc_g, s_kc_s, s_cos,
                     H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REP: tl.constexpr,
                     REP_PAD: tl.constexpr, Wp: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One (row, kv head) at a time: RoPE on its queries and key, the key and value into the row's cache slot
    t - 1, then its queries against the group's prompt and the row's completion so far."""
    NQKV: tl.constexpr = (H + 2 * HKV) * D
    m = tl.arange(0, REP_PAD)[:, None]
    d = tl.arange(0, D)
    partner = (d + D // 2) % D  # rotate_half(x)[d] = -+x[partner[d]]; the sign is in SIN
    for item in range(pid, R * HKV, NP):
        r, h = item // HKV, item % HKV
        p, g = r // G, r % G
        pos = tl.load(POS0 + r) + t - 1
        cos = tl.load(COS + pos * s_cos + d).to(tl.float32)
        sin = tl.load(SIN + pos * s_cos + d).to(tl.float32)
        row = QKV + r * NQKV
        q_at = row + (h * REP + m) * D
        q_x = tl.load(q_at + d[None, :], mask=m < REP, other=0.0, cache_modifier=".cg").to(tl.float32)
        q_p = tl.load(q_at + partner[None, :], mask=m < REP, other=0.0, cache_modifier=".cg").to(tl.float32)
        q = ((q_x * cos[None, :] + q_p * sin[None, :]) * scale).to(QKV.dtype.element_ty)
        k_at = row + (H + h) * D
        k_x = tl.load(k_at + d, cache_modifier=".cg").to(tl.float32)
        k_p = tl.load(k_at + partner, cache_modifier=".cg").to(tl.float32)
        v = tl.load(row + (H + HKV + h) * D + d, cache_modifier=".cg")
        kc = KC + p * s_kc_p + h * s_kc_h + g * s_kc_g
        vc = VC + p * s_kc_p + h * s_kc_h + g * s_kc_g
        tl.store(kc + (t - 1) * s_kc_s + d, (k_x * cos + k_p * sin).to(KC.dtype.element_ty))
        tl.store(vc + (t - 1) * s_kc_s + d, v.to(VC.dtype.element_ty))
        tl.debug_barrier()  # the slot just written is read back below by other threads of this program
        out = _attend(q, KP + p * s_kp_p + h * s_kp_h, VP + p * s_kp_p + h * s_kp_h, BIAS + p * s_bias, kc, vc, t,
                      s_kp_s, s_kc_s, REP_PAD, D, BLOCK_N, Wp, IEEE)
        tl.store(ATT + (r * H + h * REP + m) * D + d[None, :], out.to(ATT.dtype.element_ty), mask=m < REP)


@triton.jit
def _residual_stage(A, W, X, R, pid, NP, E: tl.constexpr, K: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """x += a @ W.T, added in float32 and rounded once (as ``addmm_``)."""
    tiles_n = tl.cdiv(E, BN)
    for tile in range(pid, tl.cdiv(R, BM) * tiles_n, NP):
        m0, n0 = (tile // tiles_n) * BM, (tile % tiles_n) * BN
        acc, _, _ = _products(A, K, W, K, W, m0, n0, R, E, K, BM, BN, BK, False, IEEE)
        rm, rn = m0 + tl.arange(0, BM), n0 + tl.arange(0, BN)
        at, inside = X + rm[:, None] * E + rn[None, :], (rm[:, None] < R) & (rn[None, :] < E)
        x = tl.load(at, mask=inside, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(at, (x + acc).to(X.dtype.element_ty), mask=inside)


@triton.jit
def _mlp_stage(X, W, HB, R, eps, pid, NP, E: tl.constexpr, INTER: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """silu(gate) * up for a tile of rows and intermediate columns (gate rows of W first, then up rows)."""
    tiles_n = tl.cdiv(INTER, BN)
    for tile in range(pid, tl.cdiv(R, BM) * tiles_n, NP):
        m0, n0 = (tile // tiles_n) * BM, (tile % tiles_n) * BN
        gate, up, ss = _products(X, E, W, E, W + INTER * E, m0, n0, R, INTER, E, BM, BN, BK, True, IEEE)
        dtype = HB.dtype.element_ty
        gate = _scaled(gate, ss, E, eps, dtype).to(tl.float32)
        up = _scaled(up, ss, E, eps, dtype)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # silu rounded to the dtype, as F.silu returns it
        rm, rn = m0 + tl.arange(0, BM), n0 + tl.arange(0, BN)
        tl.store(HB + rm[:, None] * INTER + rn[None, :], act * up, mask=(rm[:, None] < R) & (rn[None, :] < INTER))


@triton.jit
def _decode_layers_kernel(
    X, QKV, ATT, HB, W_QKV, W_O, W_GU, W_D, s_l_qkv, s_l_o, s_l_gu, s_l_d,
    KP, VP, BIAS, KC, VC, s_kp_l, s_kp_p, s_kp_h, s_kp_s, s_bias, s_kc_l, s_kc_p, s_kc_h, s_kc_g, s_kc_s,
    COS, SIN, s_cos, POS0, T, COUNTER, R, G, first, last, eps, scale,
    E: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr, Wp: tl.constexpr,
    REP_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
    STAGE: tl.constexpr, SKIP: tl.constexpr, IEEE: tl.constexpr,
):
    pid, NP = tl.program_id(0), tl.num_programs(0)
    t = tl.load(T)
    NQKV: tl.constexpr = (H + 2 * HKV) * D
    for layer in range(first, last):
        at = tl.cast(layer, tl.int64)
        if (STAGE == 0 or STAGE == 1) and (SKIP >> 1) % 2 == 0:
            _qkv_stage(X, W_QKV + at * s_l_qkv, QKV, R, eps, pid, NP, E, NQKV, BM, BN, BK, IEEE)
        if STAGE == 0:
            _grid_barrier(COUNTER, ((layer - first) * STAGES + 1) * NP)
        if (STAGE == 0 or STAGE == 2) and (SKIP >> 2) % 2 == 0:
            _attention_stage(QKV, ATT, KP + at * s_kp_l, VP + at * s_kp_l, BIAS, KC + at * s_kc_l, VC + at * s_kc_l,
                             COS, SIN, POS0, t, R, G, scale, pid, NP, s_kp_p, s_kp_h, s_kp_s, s_bias,
                             s_kc_p, s_kc_h, s_kc_g, s_kc_s, s_cos, H, HKV, D, H // HKV, REP_PAD, Wp, BLOCK_N, IEEE)
        if STAGE == 0:
            _grid_barrier(COUNTER, ((layer - first) * STAGES + 2) * NP)
        if (STAGE == 0 or STAGE == 3) and (SKIP >> 3) % 2 == 0:
            _residual_stage(ATT, W_O + at * s_l_o, X, R, pid, NP, E, H * D, BM, BN, BK, IEEE)
        if STAGE == 0:
            _grid_barrier(COUNTER, ((layer - first) * STAGES + 3) * NP)
        if (STAGE == 0 or STAGE == 4) and (SKIP >> 4) % 2 == 0:
            _mlp_stage(X, W_GU + at * s_l_gu, HB, R, eps, pid, NP, E, INTER, BM, BN, BK, IEEE)
        if STAGE == 0:
            _grid_barrier(COUNTER, ((layer - first) * STAGES + 4) * NP)
        if (STAGE == 0 or STAGE == 5) and (SKIP >> 5) % 2 == 0:
            _residual_stage(HB, W_D + at * s_l_d, X, R, pid, NP, E, INTER, BM, BN, BK, IEEE)
        if STAGE == 0:
            _grid_barrier(COUNTER, ((layer - first) * STAGES + 5) * NP)


def resident_programs(kernel, device: torch.device, limit: int) -> int:
    """How many programs of a compiled kernel the GPU holds at once (at most ``limit`` a multiprocessor): a grid
    barrier needs every program resident, or the ones waiting keep the rest from starting."""
    props = torch.cuda.get_device_properties(device)
    kernel._init_handles()  # loads the binary, which is where Triton learns its register count
    warps = kernel.metadata.num_warps
    regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are handed out per warp, 256 at a time
    by_regs = 65536 // (regs_per_warp * warps)  # a multiprocessor's register file, on every NVIDIA GPU since 2012
    by_smem = props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024)  # 1 KiB the system keeps
    by_warps = props.max_threads_per_multi_processor // (32 * warps)
    return props.multi_processor_count * max(1, min(by_regs, by_smem, by_warps, limit))


class DecodeLayers:
    """The scratch buffers and launch of the persistent layers kernel for one step shape's rows."""

    def __init__(self, weights: dict[str, torch.Tensor], rows: int, heads: int, kv_heads: int, head_dim: int,
                 eps: float, programs: int | None = None, per_sm: int = 4, staged: bool = False,
                 skip: tuple[int, ...] = (), **tiles):
        """``weights``: "qkv" [L, (H + 2 Hkv) D, E], "o" [L, E, H D], "gate_up" [L, 2 I, E], "down" [L, E, I], the
        norms folded in. ``programs``: by default as many as the GPU holds at once, at most ``per_sm`` a
        multiprocessor; ``staged``: one launch per stage and layer; ``skip``: stages left out (to time the others)."""
        w_qkv = weights["qkv"]
        self.weights, self.eps = weights, eps
        self.H, self.Hkv, self.D = heads, kv_heads, head_dim
        self.E, self.inter = w_qkv.shape[2], weights["down"].shape[2]
        self.layers = w_qkv.shape[0]
        device, dtype = w_qkv.device, w_qkv.dtype
        self.programs, self.per_sm, self.staged = programs if programs or device.type == "cuda" else 8, per_sm, staged
        self.skip = sum(1 << stage for stage in skip)
        self.tiles = {**TILES, **tiles}
        self.qkv = torch.empty(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
        self.att = torch.empty(rows, heads * head_dim, dtype=dtype, device=device)
        self.hidden = torch.empty(rows, self.inter, dtype=dtype, device=device)
        self.counter = torch.zeros(COUNTERS.value * 32, dtype=torch.int32, device=device)
    def __call__(self, x: torch.Tensor, kp, vp, bias, kc, vc, cos, sin, pos0, t, group: int) -> None:
        """Runs every layer on the residual stream ``x`` [R, E] in place; kp/vp [L, Pp, Hkv, Wp, D], kc/vc
        [L, Pp, Hkv, G, W, D] (keys and values written at slot t - 1), ``bias`` [Pp, Wp], as TritonStep reads them."""
        R = x.shape[0]
        w, tiles = self.weights, self.tiles
        args = (
            x, self.qkv, self.att, self.hidden, w["qkv"], w["o"], w["gate_up"], w["down"],
            w["qkv"].stride(0), w["o"].stride(0), w["gate_up"].stride(0), w["down"].stride(0),
            kp, vp, bias, kc, vc, kp.stride(0), kp.stride(1), kp.stride(2), kp.stride(3), bias.stride(0),
            kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3), kc.stride(4),
            cos, sin, cos.stride(0), pos0, t, self.counter, R, group,
        )
        meta = dict(
            E=self.E, H=self.H, HKV=self.Hkv, D=self.D, INTER=self.inter, Wp=kp.shape[3],
            REP_PAD=max(16, triton.next_power_of_2(self.H // self.Hkv)), BM=tiles["block_m"], BN=tiles["block_n"],
            BK=tiles["block_k"], BLOCK_N=64, SKIP=self.skip, IEEE=x.dtype == torch.float32,
            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        )
        scale = self.D**-0.5
        if self.staged:
            for layer in range(self.layers):
                for stage in range(1, STAGES.value + 1):
                    _decode_layers_kernel[(self.programs,)](*args, layer, layer + 1, self.eps, scale, STAGE=stage, **meta)
            return
        if self.programs is None:
            kernel = _decode_layers_kernel.warmup(*args, 0, self.layers, self.eps, scale, STAGE=0, grid=(1,), **meta)
            self.programs = resident_programs(kernel, x.device, self.per_sm)
        self.counter.zero_()
        _decode_layers_kernel[(self.programs,)](*args, 0, self.layers, self.eps, scale, STAGE=0, **meta)
