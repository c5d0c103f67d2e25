"""Probe: do the decode step's products and attention run faster from L2, and does prefetching the next layer pay?"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.decode_kernels import time_us  # noqa: E402
from rlreason.rollout import triton_decode as K  # noqa: E402


@triton.jit
def _prefetch_kernel(X, T, row_stride, row_bytes, slot_bytes, USE_T: tl.constexpr, LOAD: tl.constexpr,
                     SINK, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK * 128
    n = row_bytes
    if USE_T:
        n = tl.load(T) * slot_bytes
    if start < n:
        offs = tl.minimum(start + tl.arange(0, BLOCK) * 128, n - 1)
        ptrs = X + row * row_stride + offs
        if LOAD:
            v = tl.load(ptrs, cache_modifier=".cg")
            s = tl.sum(v.to(tl.int32), axis=0)
            tl.store(SINK, s, mask=s == 123456789)
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                      is_pure=False, pack=1)


SINK = None


def prefetch(x: torch.Tensor, rows: int = 1, t=None, slot_bytes: int = 0, load: bool = False, block: int = 1024):
    flat = x.view(torch.uint8) if x.dtype != torch.uint8 else x
    row_stride = flat.numel() // rows
    chunks = triton.cdiv(row_stride, block * 128)
    _prefetch_kernel[(rows, chunks)](flat, t if t is not None else flat, row_stride, row_stride, slot_bytes,
                                     USE_T=t is not None, LOAD=load, SINK=SINK, BLOCK=block, num_warps=4)


def main() -> None:
    global SINK
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    SINK = torch.zeros(1, dtype=torch.int32, device=dev)
    P, G, H, Hkv, D, Wp, Wc, hidden, inter, layers = 16, 8, 15, 5, 64, 64, 256, 960, 2560, 32
    R = P * G
    print(torch.cuda.get_device_name(), "L2", torch.cuda.get_device_properties(0).L2_cache_size >> 20, "MiB", flush=True)
    q = torch.randn(R, H, D, device=dev, dtype=dt)
    kp, vp = (torch.randn(layers, P, Hkv, Wp, D, device=dev, dtype=dt) for _ in range(2))
    kc, vc = (torch.randn(layers, P, Hkv, G, Wc, D, device=dev, dtype=dt) for _ in range(2))
    bias = torch.zeros(P, Wp, device=dev)
    shapes = {"qkv": ((H + 2 * Hkv) * D, hidden), "o": (hidden, H * D), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    per = sum(a * b for a, b in shapes.values())
    flat = [torch.randn(per, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
    weights = {name: [] for name in shapes}
    for i in range(layers):
        at = 0
        for name, (a, b) in shapes.items():
            weights[name].append(flat[i][at: at + a * b].view(a, b))
            at += a * b
    x = torch.randn(R, hidden, device=dev, dtype=dt)
    inputs = {"qkv": x, "o": x, "gate_up": x, "down": torch.randn(R, inter, device=dev, dtype=dt)}

    def per_layer(fn, reps=4) -> float:
        return time_us(lambda: [fn(i) for i in range(layers)], reps=reps) / layers

    for name in shapes:
        cold = per_layer(lambda i, name=name: F.linear(inputs[name], weights[name][i]))
        hot = per_layer(lambda i, name=name: F.linear(inputs[name], weights[name][0]))
        print(f"projection {name} {shapes[name]}: cold {cold:.1f} us, L2-hot {hot:.1f} us", flush=True)
    t = torch.tensor(128, device=dev)
    for hot_kv in (False, True):
        us = per_layer(lambda i, hot_kv=hot_kv: K.decode_attention(
            q, kp[0 if hot_kv else i], vp[0 if hot_kv else i], bias, kc[0 if hot_kv else i], vc[0 if hot_kv else i], t, G))
        print(f"attention at t=128, {'L2-hot' if hot_kv else 'cold'}: {us:.1f} us", flush=True)
    for load in (False, True):
        us = per_layer(lambda i, load=load: prefetch(flat[i], load=load))
        print(f"prefetch of a layer's weights ({flat[0].numel() * 2 / 1e6:.1f} MB) alone, load={load}: {us:.1f} us", flush=True)

    cos, sin = torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt), torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt)
    pos0 = torch.full((R,), Wp, device=dev)
    residual = torch.randn(R, hidden, device=dev, dtype=dt)
    side = torch.cuda.Stream()
    slot_bytes = D * 2

    def layer(i: int, mode: str, load: bool = False) -> None:
        j = 0 if mode == "hot" else i
        if mode.startswith("prefetch"):
            nxt = (i + 1) % layers
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch(flat[nxt], load=load)
                if mode == "prefetch+kv":
                    prefetch(kp[nxt], load=load)
                    prefetch(vp[nxt], load=load)
                    prefetch(kc[nxt], rows=P * Hkv * G, t=t, slot_bytes=slot_bytes, load=load)
                    prefetch(vc[nxt], rows=P * Hkv * G, t=t, slot_bytes=slot_bytes, load=load)
        qh = K.rope_and_cache(F.linear(residual, weights["qkv"][j]), residual, None, cos, sin, pos0, t, kc[j], vc[j],
                              None, None, 1e-5, H, Hkv, D, G)
        residual.addmm_(K.decode_attention(qh, kp[j], vp[j], bias, kc[j], vc[j], t, G), weights["o"][j].t())
        residual.addmm_(K.silu_mul(F.linear(residual, weights["gate_up"][j]), residual, None, 1e-5), weights["down"][j].t())
        residual.mul_(0.01)
        if mode.startswith("prefetch"):
            torch.cuda.current_stream().wait_stream(side)

    for mode, load in (("cold", False), ("hot", False), ("prefetch", False), ("prefetch", True), ("prefetch+kv", False),
                       ("prefetch+kv", True), ("cold", False)):
        try:
            us = per_layer(lambda i, mode=mode, load=load: layer(i, mode, load))
            print(f"one layer at t=128, {mode} (load={load}): {us:.1f} us", flush=True)
        except Exception as error:
            print(f"one layer, {mode} (load={load}): {type(error).__name__}: {error}"[:400], flush=True)


if __name__ == "__main__":
    main()
