#!/bin/bash
# The GPU benchmark in one command (device tool): checks, then each config of rlreason vs TRL, P=16 G=8.
#   CHECKS=1 CONFIGS="360m:256:2:1:16 135m:256:2:1:16" benchmarks/gpu_run.sh
# A config is model:max_new_tokens:timed_steps:warmup_steps:micro_batch[:timeout_s[:sides]]; sides "rlreason" or
# "trl" runs one side alone, in its own process (long completions, where TRL's slow generation could otherwise use
# up the time of both). Needs .whl (trl, datasets,
# dill, multiprocess wheels) and .bench_assets/tokenizer (the default model's tokenizer) carried along.
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if [ -n "$CHECKS" ]; then
  timeout 150 python3 benchmarks/gpu_checks.py --tokenizer .bench_assets/tokenizer 2>&1 | grep -v -i warn | tee "$OUT/checks.log"
fi
for cfg in $CONFIGS; do
  IFS=: read -r model L steps warmup mb limit sides <<< "$cfg"
  sides=${sides:-rlreason,trl}
  echo "=== $model L=$L $sides" | tee -a "$OUT/bench.log"
  timeout "${limit:-200}" python3 benchmarks/throughput.py --model "$model" --prompts 16 --group 8 --max-new-tokens "$L" \
    --steps "$steps" --warmup "$warmup" --micro-batch "$mb" --tokenizer .bench_assets/tokenizer --sides "$sides" ${EXTRA} \
    --json "$OUT/results.jsonl" > "$OUT/run-$model-$L-${sides/,/-}.log" 2>&1
  echo "exit $?" >> "$OUT/run-$model-$L-${sides/,/-}.log"
  grep -E '^\||^ratio|^floor|decode|generate |ceilings|P=16|^  (rlreason|TRL)|Error|error|exit' "$OUT/run-$model-$L-${sides/,/-}.log" | grep -v -i warn | tee -a "$OUT/bench.log"
done
# few files come back from the machine: the per-run logs travel packed
ls "$OUT"/run-*.log >/dev/null 2>&1 && tar czf "$OUT/run-logs.tgz" -C "$OUT" $(cd "$OUT" && ls run-*.log) && rm "$OUT"/run-*.log
