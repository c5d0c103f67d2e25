"""On a GPU: the decode step's parts at a benchmark shape (16 prompts x 8 completions), timed one by one.

    python benchmarks/decode_kernels.py [--sweep] [--model 360m|1.7b]

Times, with CUDA events over many repeats: the Triton decode attention (with --sweep: for each tile and launch
shape; at an early, a middle and a late step), the four projections of a layer through cuBLAS (the output ones also as the in-place
``addmm_`` the engine uses), the other kernels of a layer, a whole layer, and one step's draw and bookkeeping by
PyTorch ops against ``sample_and_record``; so the launch shape in rlreason.rollout.triton_decode.ATTENTION_LAUNCH is
chosen by measurement, and a layer's time can be read against the sum of its parts.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.workload import SHAPES  # noqa: E402
from rlreason.rollout import sampling  # noqa: E402
from rlreason.rollout import triton_decode as K  # noqa: E402


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
    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "360m"
    if model not in SHAPES:
        sys.exit(f"--model: {model!r} is not one of {', '.join(SHAPES)}")
    shape = SHAPES[model]
    H, Hkv, hidden, inter, layers = (shape[k] for k in ("num_attention_heads", "num_key_value_heads", "hidden_size",
                                                          "intermediate_size", "num_hidden_layers"))
    P, G, D, Wp, Wc, vocab = 16, 8, hidden // H, 64, 256, 49152
    print(f"{model}: {layers} layers, hidden {hidden}, {H} heads ({Hkv} kv), MLP {inter}")
    R = P * G
    # every layer its own weights and caches, run in turn as in the step: a layer's bytes come from memory, not from
    # the cache the previous call of the same kernel left warm (one layer's keys and values fit in the 50 MB L2)
    q = torch.randn(R, H, D, device=dev, dtype=dt)
    kp, vp = (torch.randn(layers, P, Hkv, Wp, D, device=dev, dtype=dt) for _ in range(2))
    kc, vc = (torch.randn(layers, P, Hkv, G, Wc, D, device=dev, dtype=dt) for _ in range(2))
    bias = torch.zeros(P, Wp, device=dev)

    def per_layer(fn) -> float:
        return time_us(lambda: [fn(i) for i in range(layers)], reps=4) / layers

    print("decode attention (us a layer) at step t = 16 / 128 / 240")
    sweep = itertools.product((32, 64, 128, 256), (2, 4, 8), (1, 2, 3))
    for block_n, warps, stages in sweep if "--sweep" in sys.argv else [tuple(K.ATTENTION_LAUNCH.values())]:
        row = []
        try:
            for step in (16, 128, 240):
                t = torch.tensor(step, device=dev)
                launch = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                row.append(per_layer(lambda i, t=t, launch=launch: K.decode_attention(q, kp[i], vp[i], bias, kc[i], vc[i], t, G, **launch)))
        except Exception as error:  # a tile too large for the chip's shared memory, say
            print(f"  block_n {block_n:3d} warps {warps} stages {stages}: {type(error).__name__}", flush=True)
            continue
        print(f"  block_n {block_n:3d} warps {warps} stages {stages}: " + " / ".join(f"{x:6.1f}" for x in row)
              + f"   mean {sum(row) / 3:6.1f}", flush=True)

    def weights_of(rows: int, cols: int) -> list[torch.Tensor]:
        return [torch.randn(rows, cols, device=dev, dtype=dt) for _ in range(layers)]

    x = torch.randn(R, hidden, device=dev, dtype=dt)
    weights = {"qkv": weights_of((H + 2 * Hkv) * D, hidden), "o": weights_of(hidden, H * D),
               "gate_up": weights_of(2 * inter, hidden), "down": weights_of(hidden, inter)}
    inputs = {"qkv": x, "o": x, "gate_up": x, "down": torch.randn(R, inter, device=dev, dtype=dt)}
    for name, ws in weights.items():
        us = per_layer(lambda i, ws=ws, name=name: F.linear(inputs[name], ws[i]))
        print(f"projection {name} {tuple(ws[0].shape)}: {us:.1f} us ({ws[0].numel() * 2 / us / 1e6:.2f} TB/s of weights)")
    for name in ("o", "down"):
        residual = torch.randn(R, hidden, device=dev, dtype=dt)
        us = per_layer(lambda i, name=name, residual=residual: residual.addmm_(inputs[name], weights[name][i].t()))
        print(f"projection {name} added in place (addmm_): {us:.1f} us")
    head = torch.randn(vocab, hidden, device=dev, dtype=dt)
    print(f"head {tuple(head.shape)}: {time_us(lambda: F.linear(x, head)):.1f} us")

    cos, sin = torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt), torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt)
    pos0, t = torch.full((R,), Wp, device=dev), torch.tensor(128, device=dev)
    qkv, gate_up = F.linear(x, weights["qkv"][0]), F.linear(x, weights["gate_up"][0])
    norm_weight = torch.ones(hidden, device=dev, dtype=dt)
    parts = {
        "rope_and_cache": lambda i: K.rope_and_cache(qkv, x, None, cos, sin, pos0, t, kc[i], vc[i], None, None, 1e-5, H, Hkv, D, G),
        "silu_mul": lambda i: K.silu_mul(gate_up, x, None, 1e-5),
        "rms_norm": lambda i: K.rms_norm(x, norm_weight, 1e-5),
    }
    for name, fn in parts.items():
        print(f"{name}: {per_layer(fn):.1f} us")
    residual = torch.randn(R, hidden, device=dev, dtype=dt)

    def layer(i: int) -> None:
        q = K.rope_and_cache(F.linear(residual, weights["qkv"][i]), residual, None, cos, sin, pos0, t, kc[i], vc[i], None,
                             None, 1e-5, H, Hkv, D, G)
        residual.addmm_(K.decode_attention(q, kp[i], vp[i], bias, kc[i], vc[i], t, G), weights["o"][i].t())
        residual.addmm_(K.silu_mul(F.linear(residual, weights["gate_up"][i]), residual, None, 1e-5), weights["down"][i].t())
        residual.mul_(0.01)  # keeps the stream finite over many replays (one more small launch)

    print(f"one layer (7 launches, plus one to keep it finite) at step 128: {per_layer(layer):.1f} us")

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
