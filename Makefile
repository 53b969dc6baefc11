# cxrbench: `make test` and `make demo` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrbench-installed
BUILD ?= build
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo data-tour benchmarks clean help

help:
	@echo "make test        create/refresh .venv, then run the whole test suite"
	@echo "make demo        create/refresh .venv, then run the demo (see README)"
	@echo "make benchmarks  speed and memory tables under build/benchmarks/"
	@echo "make clean       remove build/ and caches (keeps .venv)"

# The venv is rebuilt when missing, or refreshed when pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

# Until the dashboard exists, the demo is the executed data tour (notebook + HTML under build/).
demo: data-tour

data-tour: venv
	@mkdir -p $(BUILD)
	$(VENV)/bin/papermill --log-level WARNING notebooks/00_data_tour.ipynb $(BUILD)/00_data_tour.ipynb
	$(VENV)/bin/jupyter nbconvert --log-level WARN --to html $(BUILD)/00_data_tour.ipynb --output-dir $(BUILD)
	@echo
	@echo "executed notebook: $(abspath $(BUILD)/00_data_tour.ipynb)"
	@echo "HTML:              $(abspath $(BUILD)/00_data_tour.html)"

benchmarks: venv
	@mkdir -p $(BUILD)/benchmarks
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b --out $(BUILD)/benchmarks || exit 1; done

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
