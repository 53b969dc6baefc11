# cxrbench: `make test` and `make demo` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrbench-installed
BUILD ?= build
PYTEST_ARGS ?=

PORT ?= 8866
# under CI (CI=true, as CI services and .ci/run set it) a missing prerequisite is an error, never a skip
CI_STRICT := $(filter true True TRUE 1 yes,$(CI))

.PHONY: venv browser lint test test-fast demo demo-prepare bundles data-tour notebooks-html benchmarks clean help

help:
	@echo "make lint        ruff (cxrbench, tests, benchmarks) and mypy (the package), configured in pyproject.toml"
	@echo "make test        create/refresh .venv, make lint, then run the whole test suite"
	@echo "make demo        create/refresh .venv, train the demo bundles once, serve the dashboard on 127.0.0.1:$(PORT)"
	@echo "make data-tour   execute notebooks/00_data_tour.ipynb into build/ (+ HTML)"
	@echo "make bundles     train (once) the shared small bundles the notebooks reuse (cxrbench bundles prepare)"
	@echo "make notebooks-html  execute every notebook into build/notebooks/ and export HTML that renders offline"
	@echo "                 (NB_PARAMS=file.json: papermill parameters per notebook; NB_ONLY=\"02 04\": a subset)"
	@echo "make benchmarks  speed and memory tables under build/benchmarks/ (bench_dashboard drives Chromium)"
	@echo "make clean       remove build/ and caches (keeps .venv)"

# The venv is rebuilt when missing, or refreshed when pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`). Without root or
# sudo it is a warning (the browser tests then skip), except under CI=true, where it is an error.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif [ -n "$(CI_STRICT)" ]; then echo "error: chromium is missing and cannot be installed (not root, no sudo); CI needs it for the browser tests" >&2; exit 1; \
	  else echo "warning: chromium missing and cannot apt-get install it: browser tests will be skipped"; fi; }
	@command -v chromium >/dev/null 2>&1 || [ -z "$(CI_STRICT)" ] || { echo "error: chromium is still missing after apt-get install" >&2; exit 1; }

# code health: ruff and mypy (the dev extra installs both), configured in pyproject.toml; `make test` runs it first
lint: venv
	$(PY) -m ruff check cxrbench tests benchmarks
	$(PY) -m mypy

test: lint browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

# The dashboard on the demo bundles (trained by `cxrbench demo prepare` on $$CXRBENCH_DATA, default
# ../shared/data/cxr, else synthetic phantoms; cached in build/demo), served by Voila on 127.0.0.1.
# COUNTERFACTUAL=1 also trains the Latent Shift autoencoder (once; about 2 min more) for the counterfactual panel.
DEMO_FLAGS = $(if $(COUNTERFACTUAL),--counterfactual)
demo: venv
	$(VENV)/bin/cxrbench demo serve --port $(PORT) $(DEMO_FLAGS)

demo-prepare: venv
	$(VENV)/bin/cxrbench demo prepare $(DEMO_FLAGS)

bundles: venv
	$(VENV)/bin/cxrbench bundles prepare

data-tour: venv
	@mkdir -p $(BUILD)
	$(VENV)/bin/papermill --log-level WARNING notebooks/00_data_tour.ipynb $(BUILD)/00_data_tour.ipynb
	$(VENV)/bin/jupyter nbconvert --log-level WARN --to html $(BUILD)/00_data_tour.ipynb --output-dir $(BUILD)
	@echo
	@echo "executed notebook: $(abspath $(BUILD)/00_data_tour.ipynb)"
	@echo "HTML:              $(abspath $(BUILD)/00_data_tour.html)"

# The shared bundles first (trained once into $CXRBENCH_CACHE/bundles, then reused), then every notebook at its
# defaults (or NB_PARAMS, a JSON file: notebook name -> parameters), executed into build/notebooks/ and exported to HTML with a local MathJax (npm, once) and plotly.js embedded: it renders offline.
NB_PARAMS ?=
NB_ONLY ?=
notebooks-html: venv
	$(PY) -m cxrbench.cli.notebooks --out $(BUILD)/notebooks $(if $(NB_PARAMS),--parameters $(NB_PARAMS)) \
	  $(if $(NB_ONLY),--only $(NB_ONLY))

benchmarks: venv browser
	$(PY) -m pip install --quiet --no-deps torchxrayvision grad-cam ttach opencv-python-headless
	@mkdir -p $(BUILD)/benchmarks
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b --out $(BUILD)/benchmarks || exit 1; done

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
