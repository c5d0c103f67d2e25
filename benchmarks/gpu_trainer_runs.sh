#!/bin/bash
# `rlreason train` on one GPU through accelerate, the single-GPU config against FSDP2 on one process, both with the
# fast engine: random-init SmolLM2-360M or Llama-1.7B shapes (MODEL=360m|1.7b), P=16, G=8, L=256, a few steps.
# Needs .whl and .bench_assets/tokenizer carried; prints the median step time of each and their ratio.
source "$(dirname "$0")/gpu_env.sh"
MODEL=${MODEL:-360m} STEPS=${STEPS:-5}
python3 - "$MODEL" <<'PY'
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained(".bench_assets/tokenizer")
shapes = {"360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                       num_key_value_heads=5, tie_word_embeddings=True),
          "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=32, tie_word_embeddings=True)}
cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, rope_theta=100000, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=1, **shapes[sys.argv[1]])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/model")
tok.save_pretrained("/tmp/model")
PY
for name in single_gpu fsdp2; do
  timeout 300 python3 -m accelerate.commands.launch --config_file configs/accelerate/$name.yaml --num_processes 1 \
    -m rlreason.train configs/default.yaml model.name=/tmp/model run.output_dir=/tmp/run-$name \
    sft.data=null train.steps=$STEPS rollout.prompts_per_step=16 rollout.group_size=8 rollout.max_new_tokens=256 \
    train.micro_batch_size=16 run.eval_before=false task.eval_size=16 rollout.engine=fast run.progress=false \
    run.save_every=0 > "$OUT/$name.log" 2>&1
  echo "=== $name exit $?" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
done
python3 - <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics
def steps(name):
    return [json.loads(line) for line in open(f"/tmp/run-{name}/metrics.jsonl")]
median = {}
for name in ("single_gpu", "fsdp2"):
    rows = steps(name)
    for r in rows:
        print(name, "step", r["step"], "time_step %.2f s" % r["time_step"], "generate %.2f" % r["time_generate"],
              "optimize %.2f" % r["time_optimize"], "len %.0f" % r["completion_length"])
    median[name] = statistics.median(r["time_step"] for r in rows[1:])  # the first step records graphs and warms up
print("median step after the first: single_gpu %.2f s, fsdp2 %.2f s, fsdp2 / single_gpu %.2fx"
      % (median["single_gpu"], median["fsdp2"], median["fsdp2"] / median["single_gpu"]))
PY
