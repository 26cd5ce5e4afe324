# Two commands on a fresh machine (DESIGN.md §6): `make reproduce` and `make test`.
# Both bootstrap .venv when it is missing: torch first (the CPU build 2.13.0), then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= tiny
SEEDS ?= 1

.PHONY: reproduce test lint venv clean-runs

$(BIN)/bts:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# mergekit without its (heavy, CUDA-pulling) dependencies: the TIES tests compare against its merge functions.
	$(BIN)/pip install --quiet --no-deps mergekit==0.1.5

venv: $(BIN)/bts

reproduce: $(BIN)/bts
	$(BIN)/bts reproduce --profile $(PROFILE) --seeds $(SEEDS)

test: $(BIN)/bts
	$(BIN)/python -m pytest

lint: $(BIN)/bts
	$(BIN)/ruff check src tests

clean-runs:
	rm -rf runs/$(PROFILE)
