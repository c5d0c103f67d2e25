"""On a GPU: the decode step's parts at the 360M benchmark shape (16 prompts x 8 completions), timed one by one.

    python benchmarks/decode_kernels.py

Times, with CUDA events over many repeats: the Triton decode attention for each tile and launch shape (at an early,
a middle and a late step), the four projections of a layer through cuBLAS, and the sampling of one step; so the
launch shape in rlreason._triton_decode.ATTENTION_LAUNCH is chosen by measurement.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rlreason import _triton_decode as K  # noqa: E402
from rlreason import sampling  # noqa: E402


def time_us(fn, reps: int = 50, replays: int = 10) -> float:
    """Mean time of one call, launched from a CUDA graph as the engine launches it (no host time in between)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * replays) * 1e3


def main() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    P, G, H, Hkv, D, Wp, Wc, hidden, inter, vocab = 16, 8, 15, 5, 64, 64, 256, 960, 2560, 49152
    R = P * G
    q = torch.randn(R, H, D, device=dev, dtype=dt)
    kp, vp = (torch.randn(P, Hkv, Wp, D, device=dev, dtype=dt) for _ in range(2))
    kc, vc = (torch.randn(P, Hkv, G, Wc, D, device=dev, dtype=dt) for _ in range(2))
    bias = torch.zeros(P, Wp, device=dev)
    print("decode attention (us) at step t = 16 / 128 / 240")
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4), (1, 2, 3)):
        row = []
        for step in (16, 128, 240):
            t = torch.tensor(step, device=dev)
            launch = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            row.append(time_us(lambda t=t, launch=launch: K.decode_attention(q, kp, vp, bias, kc, vc, t, G, **launch)))
        print(f"  block_n {block_n:3d} warps {warps} stages {stages}: " + " / ".join(f"{x:6.1f}" for x in row)
              + f"   mean {sum(row) / 3:6.1f}", flush=True)
    x = torch.randn(R, hidden, device=dev, dtype=dt)
    weights = {
        "qkv": torch.randn((H + 2 * Hkv) * D, hidden, device=dev, dtype=dt),
        "o": torch.randn(hidden, H * D, device=dev, dtype=dt),
        "gate_up": torch.randn(2 * inter, hidden, device=dev, dtype=dt),
        "down": torch.randn(hidden, inter, device=dev, dtype=dt),
        "head": torch.randn(vocab, hidden, device=dev, dtype=dt),
    }
    inputs = {"qkv": x, "o": x, "gate_up": x, "down": torch.randn(R, inter, device=dev, dtype=dt), "head": x}
    for name, w in weights.items():
        us = time_us(lambda w=w, name=name: F.linear(inputs[name], w))
        print(f"projection {name} {tuple(w.shape)}: {us:.1f} us ({w.numel() * 2 / us / 1e6:.2f} TB/s of weights)")
    logits = torch.randn(R, vocab, device=dev) * 3
    seeds, t = torch.arange(R, device=dev), torch.tensor(5, device=dev)

    def old_draw():
        probs = torch.softmax(logits, dim=-1).double()
        cdf = probs.cumsum(dim=-1)
        u = sampling.uniforms(seeds, t)
        return torch.searchsorted(cdf, (u.unsqueeze(-1) * cdf[..., -1:]).contiguous())

    def new_draw():
        return sampling.draw(torch.softmax(logits, dim=-1), sampling.uniforms(seeds, t))

    print(f"sampling one step: float64 flat cumsum {time_us(old_draw):.1f} us, two-level draw {time_us(new_draw):.1f} us")


if __name__ == "__main__":
    main()
