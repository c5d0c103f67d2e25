"""Whether a GPU runs a decode step's kernels beside a training pass's products: the bound on train.async_rollouts.

Two CUDA graphs, each timed alone and then replayed on two streams at once (the decode graph's stream at high
priority, as the engine's is under train.async_rollouts):

- "train": 20 products of the 360M model's shape at micro-batch 128 (40960 x 960 @ 960 x 5120, bf16);
- "decode": 8 decode steps' products (32 layers of the 360M model's four projections on 128 rows).

Side by side they take ``max`` of the two where the GPU overlaps them and the sum where it does not. Two decode
graphs side by side, and two chains of small elementwise kernels, show whether the streams overlap at all.
``--carveout N`` leaves N SMs out of cuBLAS's products (torch._C._set_sm_carveout_experimental); ``--green N``
runs the decode graph in a green context of N SMs and the training one in another of the rest.

    python3 benchmarks/stream_overlap.py [--carveout 16] [--green 32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

BF16 = torch.bfloat16


def record(fn: Callable[[], None], stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    with torch.cuda.stream(stream):
        fn()  # warm-up: cuBLAS picks its kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        fn()
        graph.capture_end()
    torch.cuda.synchronize()
    return graph


def timed(label: str, launches: list[tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, int]], reps: int = 20) -> float:
    """Milliseconds per round of ``launches`` (graph, stream, replays), every stream's work queued before waiting."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for graph, stream, n in launches:
            with torch.cuda.stream(stream):
                for _ in range(n):
                    graph.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / reps * 1e3
    print(f"{label}: {ms:.2f} ms", flush=True)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carveout", type=int, default=None, help="SMs left out of cuBLAS's products")
    parser.add_argument("--green", type=int, default=None, help="SMs of the decode graph's green context")
    args = parser.parse_args()
    rows = torch.randn(40960, 960, device="cuda", dtype=BF16)
    up = torch.randn(960, 5120, device="cuda", dtype=BF16)
    x, wide = torch.randn(128, 960, device="cuda", dtype=BF16), torch.randn(128, 2560, device="cuda", dtype=BF16)
    qkv, o, gate_up = (torch.randn(960, n, device="cuda", dtype=BF16) for n in (1600, 960, 5120))
    down = torch.randn(2560, 960, device="cuda", dtype=BF16)
    small = [torch.ones(1024, device="cuda") for _ in range(2)]

    def train() -> None:
        for _ in range(20):
            rows @ up

    def decode() -> None:
        for _ in range(32):
            x @ qkv, x @ o, x @ gate_up, wide @ down

    def elementwise(t: torch.Tensor) -> Callable[[], None]:
        def chain() -> None:
            for _ in range(200):
                t.mul_(1.0001)

        return chain

    high, low = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)
    if args.carveout is not None:
        torch._C._set_sm_carveout_experimental(args.carveout)
    if args.green is not None:
        from torch.cuda.green_contexts import GreenContext

        sms = torch.cuda.get_device_properties(0).multi_processor_count
        contexts = [GreenContext.create(num_sms=n, device_id=0) for n in (args.green, sms - args.green)]  # kept alive
        high, low = (c.Stream() for c in contexts)
    t, d, d2 = record(train, low), record(decode, high), record(decode, low)
    e1, e2 = record(elementwise(small[0]), low), record(elementwise(small[1]), high)
    alone_t = timed("train alone", [(t, low, 1)])
    alone_d = timed("decode alone", [(d, high, 8)])
    both = timed("train and decode side by side", [(t, low, 1), (d, high, 8)])
    timed("two decode graphs side by side", [(d2, low, 8), (d, high, 8)])
    timed("200 small elementwise kernels alone", [(e1, low, 1)])
    timed("two such chains side by side", [(e1, low, 1), (e2, high, 1)])
    overlap = (alone_t + alone_d - both) / min(alone_t, alone_d)
    print(f"train and decode: {both:.2f} ms against {max(alone_t, alone_d):.2f} (overlapped) and "
          f"{alone_t + alone_d:.2f} (one after the other): {overlap:.0%} of the shorter one hidden")


if __name__ == "__main__":
    main()
