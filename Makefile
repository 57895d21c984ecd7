# The two commands of the README: `make default` (the main job on the embedded default) and `make test`.
# Both install first when needed (a venv in .venv, CPU-only torch pinned: no multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.cpt-installed

.PHONY: install default test lint

# Downloads are retried: a dropped connection mid-wheel (torch's 286 MB triton) must not fail CI. pip
# itself retries and resumes (--resume-retries, pip >= 25.1, hence the upgrade first); the loop retries the
# whole command when pip gives up.
PIP_NET = --retries 10 --timeout 60
PIP_RESUME = --resume-retries 20
with_retries = for attempt in 1 2 3 4; do $(1) && exit 0; \
	echo "install: attempt $$attempt of 4 did not finish (network?); trying again in 20 s"; sleep 20; done; exit 1

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(call with_retries,$(BIN)/pip install -q $(PIP_NET) --upgrade pip)
	$(call with_retries,$(BIN)/pip install -q $(PIP_NET) $(PIP_RESUME) torch==2.13.0)
	$(call with_retries,$(BIN)/pip install -q $(PIP_NET) $(PIP_RESUME) -e ".[dev]")
	touch $(STAMP)

install: $(STAMP)

default: $(STAMP)  ## the main job on the embedded default (CPU, no network, ~5 minutes)
	$(BIN)/cpt-plugin train

test: $(STAMP)  ## the test suite (CPU; Triton kernels through TRITON_INTERPRET=1), on up to 4 cores
	$(BIN)/python -m pytest -q --numprocesses=auto --maxprocesses=4

lint: $(STAMP)
	$(BIN)/ruff check cpt_plugin tests benchmarks examples
