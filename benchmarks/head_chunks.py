"""On a GPU: the training head (log-probs of the sampled tokens through the vocabulary projection, forward and
backward) at the benchmark's shapes, for several chunk sizes.

    python benchmarks/head_chunks.py

The head runs a chunk of tokens at a time (rlreason.training.logprobs.GPU_CHUNK_BYTES) so that no [tokens, vocab]
tensor outlives its chunk; this times what a chunk size costs, so that the default is chosen by measurement. A row
per shape and chunk size: the time of one micro-batch's head, forward and backward, its rate against the products'
FLOPs (the logits twice, the backward's two products), and the peak memory it allocated.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rlreason.training import logprobs  # noqa: E402

SHAPES = {  # name: (tokens of one micro-batch, hidden size); SmolLM2's vocabulary
    "360m mb64 L256": (64 * 256, 960),
    "1.7b mb16 L256": (16 * 256, 2048),
    "1.7b mb32 L256": (32 * 256, 2048),
}
VOCAB = 49152
CHUNK_MIB = (64, 256, 1024, 4096)


def time_ms(fn, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, math: logprobs.HeadMath) -> None:
    """One micro-batch's head under bf16 autocast, as the trainer runs it, forward and backward."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp, _ = logprobs._head_logprobs(hidden, weight, None, targets, 1.0, False, math)
    lp.sum().backward()


def main() -> None:
    torch.manual_seed(0)
    math = logprobs.compiled_head_math()
    print("| shape | chunk (MiB of float32 logits) | tokens a chunk | ms | TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, (tokens, hidden_size) in SHAPES.items():
        weight = torch.nn.Parameter(torch.randn(VOCAB, hidden_size, device="cuda") * 0.02)
        hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(VOCAB, (tokens,), device="cuda")

        flop = 4 * 2 * tokens * hidden_size * VOCAB
        for mib in CHUNK_MIB:
            logprobs.GPU_CHUNK_BYTES = mib << 20
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(partial(head, hidden, weight, targets, math))
            peak = torch.cuda.max_memory_allocated() / 2**30
            chunk = min(logprobs.head_chunk_tokens("cuda", VOCAB), tokens)
            print(f"| {name} | {mib} | {chunk} | {ms:.2f} | {flop / ms / 1e9:.0f} | {peak:.2f} |", flush=True)
        weight.grad = hidden.grad = None


if __name__ == "__main__":
    main()
