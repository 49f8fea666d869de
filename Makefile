# The two set-up commands of the README: `make demo` (the sample pipeline) and `make test`.
# Both create .venv and install the project with every pinned dependency first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-cluster lint bench clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Runs the whole DVC pipeline on the built-in sample (local Ray, local MLflow store).
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipeline.ray_cluster -- dvc repro

# Two pytest workers (pytest-xdist); the tests that start Ray share one of them (tests/conftest.py).
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The cluster path: a two-node Ray cluster and an MLflow server on this machine, stages
# submitted with `ray job submit`, faults from outside (docs/cluster.md); ~15 min on 2 cores.
test-cluster: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m cluster

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m benchmarks.shard_io
