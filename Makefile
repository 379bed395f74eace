# sd-workbench: the two commands of the README, plus lint.
#   make demo   create the environment, then run the main job on the builtin model: the demo
#               recipe (prune -> export -> int8 -> bench -> report) via `sdwb run`
#   make test   create the environment, then run the test suite
#   make gate   the CI performance gate: quality against reports/baselines/ (memory too when that file
#               is from the same CPU), latency and memory against the code of GATE_BASE
#               (.ci/gate-base) measured now, beside the working tree
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

.PHONY: venv test demo lint gate

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
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

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
