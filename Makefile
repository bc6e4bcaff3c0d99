# Two commands for a new machine (README):  make run   |   make test
# Both create .venv and install what is needed on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ftpipe-installed

.PHONY: install run test ui clean-store

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# No GPU: the CPU build of torch (a bare `torch` requirement would pull GBs of CUDA wheels).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[dev,postgres]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ftpipe run

# One worker per core (at most 4), each module's tests on one worker in file order, the longest
# modules first (tests/conftest.py); each worker and what it starts get their share of the cores.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations 15 tests

ui: $(STAMP)
	$(PY) mlflow/launch.py

clean-store:
	rm -rf mlflow/mlflow.db mlflow/artifacts runs
