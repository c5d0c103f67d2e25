#!/bin/bash
# `rlreason train` on one GPU through accelerate: the single-GPU config, then FSDP2 on one process.
# Random-init SmolLM2-360M shapes, P=16, G=8, L=256, a few steps. Needs .whl and .bench_assets/tokenizer carried.
source "$(dirname "$0")/gpu_env.sh"
python3 - <<'PY'
import torch
from transformers import AutoTokenizer, LlamaConfig, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained(".bench_assets/tokenizer")
cfg = LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=1)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/m360")
tok.save_pretrained("/tmp/m360")
PY
for name in single_gpu fsdp2; do
  engine=fast; [ "$name" = fsdp2 ] && engine=hf  # the fast engine reads full weights; FSDP2 runs the reference engine
  timeout 240 python3 -m accelerate.commands.launch --config_file configs/accelerate/$name.yaml --num_processes 1 \
    -m rlreason.train configs/default.yaml model.name=/tmp/m360 run.output_dir=/tmp/run-$name sft.steps=0 \
    train.steps=4 rollout.prompts_per_step=16 rollout.group_size=8 rollout.max_new_tokens=256 \
    train.micro_batch_size=16 run.eval_before=false task.eval_size=16 rollout.engine=$engine run.progress=false \
    > "$OUT/$name.log" 2>&1
  echo "=== $name exit $?" | tee -a "$OUT/summary.txt"
  python3 -c "
import json
rows=[json.loads(l) for l in open('/tmp/run-$name/metrics.jsonl')]
for r in rows: print('step', r['step'], 'time_step %.2f s' % r['time_step'], 'generate %.2f' % r['time_generate'], 'optimize %.2f' % r['time_optimize'], 'tok/s %.0f' % r['tokens_per_s'], 'len %.0f' % r['completion_length'])
" 2>&1 | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
done
