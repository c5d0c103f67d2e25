"""On a GPU: the machine's two ceilings, and the fast engine against the reference with CUDA graphs on.

    python benchmarks/gpu_checks.py [--tokenizer DIR]

Prints (and the throughput benchmark reuses the idea of) the device-to-device copy bandwidth and the bf16 matrix
rate, then checks, on random-init models built from configs:
  - float32: FastEngine (CUDA graphs, compaction) draws exactly HFEngine's tokens for the same seeds, greedy and
    sampled, its recorded log-probs match a fresh ``completion_logprobs`` pass, and later calls (its graphs
    replayed; or, freeing them after each call, recorded again without the first call's eager run) give the same
    tokens and log-probs;
  - bf16 (SmolLM2-360M shape): how far the recorded log-probs are from a fresh autocast pass (reported);
  - bf16, the decoder compiled by inductor (train.compile): left-padded rows give finite gradients, those of the eager
    model (a padding query with no key gave NaN there before it was made to attend itself).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import workload  # noqa: E402


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), medians of timed repeats."""
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def median_ms(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    bandwidth = 2 * x.numel() * 4 / (median_ms(lambda: y.copy_(x), 20) / 1e3)
    flops = 2 * 8192**3 / (median_ms(lambda: a @ b, 10) / 1e3)
    return bandwidth, flops


def check_engine(tokenizer, directory: Path) -> None:
    from rlreason.models import load_model
    from rlreason.rollout.engine import HFEngine, SamplingParams
    from rlreason.rollout.fast import FastEngine
    from rlreason.training.logprobs import completion_logprobs
    from tasks.prompts import render

    prompts = tokenizer([render(tokenizer, r["prompt"]) for r in workload.rows(6)], add_special_tokens=False)["input_ids"]

    # float32, tiny: the tokens of the reference, exactly
    workload.build_model("tiny", directory / "tiny", tokenizer, torch.float32)
    model = load_model(str(directory / "tiny")).cuda()
    with torch.no_grad():  # sharper distributions than the init: EOS appears, so compaction runs
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    hf = HFEngine(model, tokenizer)
    for kernels, name, params in [
        (kernels, name, params)
        for kernels in ("torch", "triton")
        for name, params in [
            ("greedy", SamplingParams(max_new_tokens=48, greedy=True)),
            ("sampled", SamplingParams(max_new_tokens=48)),
            ("top-k/top-p", SamplingParams(max_new_tokens=48, temperature=0.7, top_k=20, top_p=0.9)),
        ]
    ]:
        fast = FastEngine(model, tokenizer, check_every=4, kernels=kernels, release_memory=False)
        seeds = list(range(1000, 1000 + 6 * 4))
        a, b = fast.generate(prompts, 4, params, seeds=seeds), hf.generate(prompts, 4, params, seeds=seeds)
        again = [fast.generate(prompts, 4, params, seeds=seeds)]  # the recorded graphs replayed
        releasing = FastEngine(model, tokenizer, check_every=4, kernels=kernels, release_memory=True)
        again += [releasing.generate(prompts, 4, params, seeds=seeds) for _ in range(2)]  # recorded anew, no eager run
        replayed = all(bool((x.completion_ids == a.completion_ids).all() and (x.logprobs == a.logprobs).all()) for x in again)
        same = sum(x == y for x, y in zip(a.completion_ids.tolist(), b.completion_ids.tolist(), strict=False))
        equal_shape = a.completion_ids.shape == b.completion_ids.shape
        lengths = a.completion_mask.sum(1)
        with torch.no_grad():
            fresh, _ = completion_logprobs(model, a.prompt_ids.cuda(), a.prompt_mask.cuda(), a.completion_ids.cuda(), a.completion_mask.cuda(),
                                           temperature=1.0 if params.greedy else params.temperature)
        m = a.completion_mask.bool()
        diff = (a.logprobs[m] - fresh.cpu()[m]).abs().max().item()
        print(f"  float32 {kernels:6s} {name:12s}: rows identical to HFEngine {same}/{len(seeds)} (shape equal {equal_shape}); "
              f"lengths {int(lengths.min())}-{int(lengths.max())}; graphs {len(fast._ws.graphs)}; "
              f"max |logprob - fresh| {diff:.2e}; later calls identical {replayed}", flush=True)
    del model, fast, hf

    # bf16, SmolLM2-360M shape: recorded log-probs against a fresh autocast pass
    workload.build_model("360m", directory / "m360", tokenizer, torch.bfloat16)
    model = load_model(str(directory / "m360"), dtype="bfloat16").cuda()
    for kernels in ("torch", "triton"):
        engine = FastEngine(model, tokenizer, dtype=torch.bfloat16, kernels=kernels)
        r = engine.generate(prompts, 8, SamplingParams(max_new_tokens=64), seeds=list(range(48)))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fresh, _ = completion_logprobs(model, r.prompt_ids.cuda(), r.prompt_mask.cuda(), r.completion_ids.cuda(), r.completion_mask.cuda())
        m = r.completion_mask.bool()
        d = (r.logprobs[m] - fresh.float().cpu()[m]).abs()
        print(f"  bf16 360m {kernels:6s}: |recorded logprob - fresh autocast pass| mean {d.mean():.3e} max {d.max():.3e} "
              f"(mean logprob {fresh.float().cpu()[m].mean():.2f})", flush=True)


def check_compiled_padding(tokenizer, directory: Path) -> None:
    from rlreason.models import compile_decoder, load_model
    from rlreason.training.logprobs import completion_logprobs

    workload.build_model("tiny", directory / "tiny-bf16", tokenizer, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompt_ids, completion_ids = torch.randint(5, 1000, (4, 24), generator=g), torch.randint(5, 1000, (4, 40), generator=g)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    prompt_mask[0, :9], prompt_mask[1, :17], completion_mask[2, 25:] = 0, 0, 0
    batch = [t.cuda() for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)]
    grads = {}
    for compiled in (False, True):
        model = load_model(str(directory / "tiny-bf16"), dtype="bfloat16").cuda()
        if compiled:
            compile_decoder(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs, _ = completion_logprobs(model, *batch)
        (logprobs * torch.linspace(-1, 1, 4, device="cuda").unsqueeze(1)).sum().backward()
        grads[compiled] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    eager, compiled = grads[False], grads[True]
    print(f"  bf16 compiled decoder, left-padded rows: gradients finite {bool(torch.isfinite(compiled).all())}; "
          f"|compiled - eager| / |eager| {float((compiled - eager).norm() / eager.norm()):.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    bandwidth, flops = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s (read + write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from rlreason.models import load_tokenizer

        tokenizer = load_tokenizer("default")
    with tempfile.TemporaryDirectory() as tmp:
        check_engine(tokenizer, Path(tmp))
        check_compiled_padding(tokenizer, Path(tmp))


if __name__ == "__main__":
    main()
