#!/bin/bash
# The GPU benchmark in one command (device tool): checks, then each config of rlreason vs TRL, P=16 G=8.
#   CHECKS=1 CONFIGS="360m:256:2:1:16 135m:256:2:1:16" benchmarks/gpu_run.sh
# A config is model:max_new_tokens:timed_steps:warmup_steps:micro_batch[:timeout_s]. Needs .whl (trl, datasets,
# dill, multiprocess wheels) and .bench_assets/tokenizer (the default model's tokenizer) carried along.
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if [ -n "$CHECKS" ]; then
  timeout 150 python3 benchmarks/gpu_checks.py --tokenizer .bench_assets/tokenizer 2>&1 | grep -v -i warn | tee "$OUT/checks.log"
fi
for cfg in $CONFIGS; do
  IFS=: read -r model L steps warmup mb limit <<< "$cfg"
  echo "=== $model L=$L" | tee -a "$OUT/bench.log"
  timeout "${limit:-200}" python3 benchmarks/throughput.py --model "$model" --prompts 16 --group 8 --max-new-tokens "$L" \
    --steps "$steps" --warmup "$warmup" --micro-batch "$mb" --tokenizer .bench_assets/tokenizer ${EXTRA} \
    --json "$OUT/results.jsonl" > "$OUT/run-$model-$L.log" 2>&1
  echo "exit $?" >> "$OUT/run-$model-$L.log"
  grep -E '^\||^ratio|decode|generate |ceilings|P=16|^  (rlreason|TRL)|Error|error|exit' "$OUT/run-$model-$L.log" | grep -v -i warn | tee -a "$OUT/bench.log"
done
