# Each target creates .venv when it is missing and reinstalls when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch by default (about 0.2 GB instead of several GB of CUDA libraries).
# On a GPU box: make demo TORCH_SPEC='torch' (or install your CUDA build into .venv first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench chaos lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev,lab]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rloopd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "not extended"

# What would push `make test` past its 15 minutes: a real Ray cluster, the dashboard in headless Chromium,
# exports into a real MLflow store.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m extended

bench: $(STAMP)
	@for f in ops/bench/*.py; do echo "# $$f" >&2; $(BIN)/python $$f || exit 1; done

# Fault campaigns (ops/chaos): each runs on a temporary home of its own and prints one JSON line of figures.
chaos: $(STAMP)
	$(BIN)/python ops/chaos/kill.py
	$(BIN)/python ops/chaos/wal.py
	$(BIN)/python ops/chaos/storage.py
	$(BIN)/python ops/chaos/storage.py --db-cap
	$(BIN)/python ops/chaos/load.py
	$(BIN)/python ops/chaos/hostile.py
	$(BIN)/python ops/chaos/fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check daemon memory tests ops

clean:
	rm -rf $(VENV) build *.egg-info
