"""Probe: where a fast-engine generate call's prefill time goes on a GPU, eager and compiled."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from benchmarks import workload  # noqa: E402
from rlreason.rollout.engine import SamplingParams  # noqa: E402
from rlreason.rollout.fast import FastEngine  # noqa: E402


def timed(fn, bucket, name):
    def wrapper(*a, **k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t
        return out
    return wrapper


def main(name: str) -> None:
    tok = AutoTokenizer.from_pretrained(".bench_assets/tokenizer")
    cfg = LlamaConfig(**workload.SHAPES[name], vocab_size=len(tok), max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=name != "1.7b", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    eng = FastEngine(model, tok)
    prompts = [list(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
               for r in workload.rows(16)]
    sp = SamplingParams(max_new_tokens=256, temperature=1.0, min_new_tokens=256)
    for _ in range(2):
        eng.generate(prompts, 8, sp)
    parts: dict[str, float] = {}
    eng.weights.refresh = timed(eng.weights.refresh, parts, "refresh")
    eng._workspace = timed(eng._workspace, parts, "workspace")
    prefill = eng.ops.prefill
    eng.ops.prefill = timed(prefill, parts, "prefill")
    eng.ops.sample = timed(eng.ops.sample, parts, "first draw")
    for _ in range(3):
        eng.generate(prompts, 8, sp)
    s = eng.last_stats
    print(f"{name}: prefill_s {s['prefill_s'] * 1e3:.1f} ms, capture {s.get('capture_s', 0) * 1e3:.1f} ms, decode "
          f"{s['decode_s'] / s['decode_steps'] * 1e3:.2f} ms/step; parts over 3 calls (ms each): "
          + ", ".join(f"{k} {v / 3 * 1e3:.1f}" for k, v in parts.items()), flush=True)
    seen = {}

    def keep(*a, **k):
        seen["args"] = a
        return prefill(*a, **k)

    eng.ops.prefill = keep
    eng.generate(prompts, 8, sp)
    eng.weights.refresh()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill(*seen["args"])
        torch.cuda.synchronize()
    try:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"  one eager prefill: {len(events)} GPU kernels/copies, {sum(e.device_time for e in events) / 1e3:.1f} ms "
              "of GPU time", flush=True)
    except Exception as error:
        print("  profile:", type(error).__name__, error)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    parts.clear()
    compiled = torch.compile(prefill, dynamic=False)
    eng.ops.prefill = timed(compiled, parts, "prefill (compiled)")
    t = time.perf_counter()
    eng.generate(prompts, 8, sp)
    print(f"  first compiled call {time.perf_counter() - t:.1f} s", flush=True)
    parts.clear()
    for _ in range(3):
        eng.generate(prompts, 8, sp)
    s = eng.last_stats
    print(f"  compiled: prefill_s {s['prefill_s'] * 1e3:.1f} ms; "
          + ", ".join(f"{k} {v / 3 * 1e3:.1f}" for k, v in parts.items()), flush=True)


if __name__ == "__main__":
    for model_name in sys.argv[1:] or ["360m"]:
        main(model_name)
