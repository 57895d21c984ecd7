# The two commands of the README: `make default` (the main job on the embedded default) and `make test`.
# Both install first when needed (a venv in .venv, CPU-only torch pinned: no multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.cpt-installed

.PHONY: install default test lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

default: $(STAMP)  ## the main job on the embedded default (CPU, no network, ~5 minutes)
	$(BIN)/cpt-plugin train

test: $(STAMP)  ## the test suite (CPU; Triton kernels through TRITON_INTERPRET=1)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cpt_plugin tests benchmarks examples
