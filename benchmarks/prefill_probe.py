"""Probe: the fast engine's prefill on a GPU, eager and compiled (compile_prefill), prompt widths changing."""

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


def main(name: str) -> None:
    tok = AutoTokenizer.from_pretrained(".bench_assets/tokenizer")
    cfg = LlamaConfig(**workload.SHAPES[name], vocab_size=len(tok), max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=name != "1.7b", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    base = [list(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
            for r in workload.rows(16)]
    widths = [base, [p[:-2] for p in base], [p + p[-3:] for p in base], base, [p[:-1] for p in base]]
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, min_new_tokens=8)
    for compiled in (False, True, False, True):
        eng = FastEngine(model, tok, compile_prefill=compiled)
        inner, spent = eng.ops.prefill, []

        def timed(*a, inner=inner, spent=spent, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = inner(*a, **k)
            torch.cuda.synchronize()
            spent.append(time.perf_counter() - t)
            return out

        eng.ops.prefill = timed
        t = time.perf_counter()
        for prompts in widths[:3]:
            eng.generate(prompts, 8, sp)
        warm = time.perf_counter() - t
        spent.clear()
        for _ in range(3):
            for prompts in widths:
                eng.generate(prompts, 8, sp)
        print(f"{name} compile_prefill={compiled}: warm-up {warm:.1f} s; prefill {sum(spent) / len(spent) * 1e3:.1f} ms "
              f"mean over {len(spent)} calls (min {min(spent) * 1e3:.1f}, max {max(spent) * 1e3:.1f}); "
              f"prefill_s of the last {eng.last_stats['prefill_s'] * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    for model_name in sys.argv[1:] or ["360m"]:
        main(model_name)
