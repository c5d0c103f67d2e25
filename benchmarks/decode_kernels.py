"""On a GPU: the decode step's parts at the 360M benchmark shape (16 prompts x 8 completions), timed one by one.

    python benchmarks/decode_kernels.py [--sweep]

Times, with CUDA events over many repeats: the Triton decode attention (with --sweep: for each tile and launch
shape; at an early, a middle and a late step), the four projections of a layer through cuBLAS (the output ones also as the in-place
``addmm_`` the engine uses), the other kernels of a layer, a whole layer, and one step's draw and bookkeeping by
PyTorch ops against ``sample_and_record``; so the launch shape in rlreason._triton_decode.ATTENTION_LAUNCH is
chosen by measurement, and a layer's time can be read against the sum of its parts.
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
    launches = itertools.product((32, 64, 128), (2, 4), (1, 2, 3)) if "--sweep" in sys.argv else [tuple(K.ATTENTION_LAUNCH.values())]
    for block_n, warps, stages in launches:
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
    for name in ("o", "down"):
        residual = torch.randn(R, hidden, device=dev, dtype=dt)
        us = time_us(lambda name=name, residual=residual: residual.addmm_(inputs[name], weights[name].t()))
        print(f"projection {name} added in place (addmm_): {us:.1f} us")

    cos, sin = torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt), torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt)
    pos0, t = torch.full((R,), Wp, device=dev), torch.tensor(128, device=dev)
    qkv, gate_up = F.linear(x, weights["qkv"]), F.linear(x, weights["gate_up"])
    parts = {
        "rope_and_cache": lambda: K.rope_and_cache(qkv, x, None, cos, sin, pos0, t, kc, vc, None, None, 1e-5, H, Hkv, D, G),
        "silu_mul": lambda: K.silu_mul(gate_up, x, None, 1e-5),
        "rms_norm": lambda: K.rms_norm(x, weights["o"][0], 1e-5),
    }
    for name, fn in parts.items():
        print(f"{name}: {time_us(fn):.1f} us")
    residual = torch.randn(R, hidden, device=dev, dtype=dt)

    def layer():
        q = K.rope_and_cache(F.linear(residual, weights["qkv"]), residual, None, cos, sin, pos0, t, kc, vc, None, None,
                             1e-5, H, Hkv, D, G)
        residual.addmm_(K.decode_attention(q, kp, vp, bias, kc, vc, t, G), weights["o"].t())
        residual.addmm_(K.silu_mul(F.linear(residual, weights["gate_up"]), residual, None, 1e-5), weights["down"].t())
        residual.mul_(0.5)  # keeps the stream finite over many replays (one more small launch)

    print(f"one layer (7 launches, plus one to keep it finite) at step 128: {time_us(layer):.1f} us")

    logits = torch.randn(R, vocab, device=dev, dtype=dt) * 3
    seeds, t = torch.arange(R, device=dev), torch.tensor(5, device=dev)
    eos = torch.tensor([0], device=dev)
    row_ids, tokens = torch.arange(R, device=dev), torch.zeros(R, dtype=torch.long, device=dev)
    out_tokens, out_logprobs = torch.zeros(R + 1, Wc, dtype=torch.long, device=dev), torch.zeros(R + 1, Wc, device=dev)
    done = torch.zeros(R, dtype=torch.bool, device=dev)

    def torch_ops():
        plain = logits.float()
        logprobs = torch.log_softmax(plain, dim=-1)
        chosen = sampling.sample(plain, seeds, t, 1.0)
        out_tokens.index_put_((row_ids, t.expand(R)), chosen)
        out_logprobs.index_put_((row_ids, t.expand(R)), logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))
        tokens.copy_(chosen)
        done.logical_or_(torch.isin(chosen, eos))

    def fused():
        K.sample_and_record(logits, 1.0, 0, eos, seeds, t, row_ids, out_tokens, out_logprobs, tokens, done)

    print(f"draw and bookkeeping of one step: PyTorch ops {time_us(torch_ops):.1f} us, sample_and_record {time_us(fused):.1f} us")
    fused()
    expected = sampling.sample(logits.float(), seeds, t, 1.0)
    print(f"  sample_and_record draws sampling.sample's tokens: {bool((tokens == expected).all())}")


if __name__ == "__main__":
    main()
