# sd-workbench: the two commands of the README, plus lint.
#   make demo   create the environment, then run the main job on the builtin model: the demo
#               recipe (prune -> export -> int8 -> bench -> report) via `sdwb run`
#   make test   create the environment, then run the test suite (the tests marked slow excepted:
#               whole-pipeline runs of 15-60 s each; `make test-slow` runs them, and CI runs both)
#   make gate   the CI performance gate: quality against reports/baselines/ (memory too when that file
#               is from the same CPU), latency and memory against the code of GATE_BASE
#               (.ci/gate-base) measured now, beside the working tree
#   make gpu-check   the GPU check (tools/gpu_check.py): GPU-marked tests, sd15-arch / sdxl-arch UNet
#               per call, tiny-shapes end to end, training steps/s on CUDA, into runs/gpu-check/ (or
#               $OUT); GPU_CHECK_ARGS=--dry-run runs it on the CPU in about a minute
#   make gpu-wheels  download into .whl/ the wheels a lent GPU machine lacks (tools/gpu_wheels.py)
# The environment is .venv/; a stamp file makes re-runs skip the install until pyproject.toml
# changes. On machines without nvidia-smi the CPU build of torch is installed first, so pip
# does not pull a multi-GB CUDA build; override with TORCH_CPU="torch==X --index-url URL".

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdwb-installed
TORCH_CPU ?= torch==2.13.0
PIP_FLAGS ?=
PYTEST_ARGS ?=
# Extras installed by `make venv`: the CPU engines (openvino + nncf) ride along by default; the
# OpenVINO tests skip cleanly with EXTRAS=dev.
EXTRAS ?= dev,openvino
DEMO_DIR ?= runs/demo
DEMO_PROMPTS := -p "a small red circle at the top on a gray background" \
	-p "a large blue square on the left on a white background" \
	-p "a small yellow triangle in the center on a black background" \
	-p "a large green circle at the bottom on a gray background"

GATE_DIR ?= runs/ci-gate
GATE_BASELINE ?= reports/baselines/tiny-shapes-cpu.json
GATE_BASE ?= $(shell bash .ci/gate-base)
GATE_ARGS ?=
GPU_CHECK_ARGS ?=
# the GPU check runs with .venv's Python where there is one, else with $(PYTHON): on a
# lent GPU machine that is its own python3 (torch with CUDA), with no registry to make a venv from
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: venv test test-slow demo lint gate gpu-check gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
		|| { echo "error: $(PYTHON) is older than Python 3.10"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no nvidia-smi: installing the CPU build of torch first ($(TORCH_CPU))"; \
		$(BIN)/python -m pip install $(PIP_FLAGS) $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[$(EXTRAS)]'
	@touch $@

test: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

demo: venv
	@rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/sdwb models
	$(BIN)/sdwb data preview -n 16 -o $(DEMO_DIR)/data.png
	$(BIN)/sdwb generate --model builtin:tiny-shapes $(DEMO_PROMPTS) --steps 25 -o $(DEMO_DIR)/generated.png
	$(BIN)/sdwb baseline eval --prompts 54 --steps 25 --grid $(DEMO_DIR)/eval-grid.png
	$(BIN)/sdwb run configs/recipes/demo.yaml --out $(DEMO_DIR)
	@echo "demo outputs in $(DEMO_DIR)/ (run.json: every stage); the report, verdict first, is $(DEMO_DIR)/report/report.html (and report.md)"

gate: venv
	$(BIN)/sdwb bench configs/bench/ci-gate.yaml -o $(GATE_DIR) --no-progress
	$(BIN)/sdwb gate --baseline $(GATE_BASELINE) --candidate $(GATE_DIR)/results.json -c configs/gate/ci.yaml \
		--ab-rev $(GATE_BASE) -o $(GATE_DIR)/gate $(GATE_ARGS)

gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels:  # pins this environment's versions: .venv must exist (make venv)
	@test -x $(BIN)/python || { echo "error: no $(VENV)/ here: run make venv first"; exit 1; }
	$(BIN)/python tools/gpu_wheels.py
