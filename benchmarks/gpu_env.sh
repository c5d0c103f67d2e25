# Sourced by the GPU scripts: the carried wheels (.whl, and any in $WHEELS: trl, datasets, reasoning-gym and their
# dependencies) installed into the device image's own site-packages, where the code sandbox's isolated Python finds
# them too; unbuffered output, and $OUT for what comes back.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
wheels=$(ls .whl/*.whl ${WHEELS:+$WHEELS/*.whl} 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir $wheels 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --break-system-packages $wheels || exit 1
fi
export PYTHONPATH=$PWD
