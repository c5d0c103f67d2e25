# Sourced by the GPU scripts: the carried wheels (.whl: trl, datasets, dill, multiprocess) installed beside the
# device image's packages, unbuffered output, and $OUT for what comes back.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
