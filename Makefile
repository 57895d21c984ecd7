# The two commands of the README. `make install` first (CPU-only torch, pinned: no multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install default test lint

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

default:  ## the main job on the embedded default (CPU, no network)
	$(BIN)/cpt-plugin train

test:  ## the test suite (CPU; Triton kernels through TRITON_INTERPRET=1)
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check cpt_plugin tests benchmarks examples
