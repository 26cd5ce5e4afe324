# Two commands on a fresh machine (docs/design.md §6): `make reproduce` and `make test`.
# Both bootstrap .venv when it is missing: torch first (torch==2.13.0; the CPU build where the pip index serves it),
# then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= tiny
SEEDS ?= 1

.PHONY: reproduce test lint venv clean-runs

$(BIN)/bts:
	@# the code and general corpora are built from the interpreter's standard library: another Python version gives
	@# other data (docs/reproduce.md "Reproducible across machines"); say so before building on it
	@$(PYTHON) -c "import sys; v='%d.%d.%d' % sys.version_info[:3]; v == '3.11.7' or print(f'warning: {sys.executable} is Python {v}; the committed results were made with 3.11.7, and the embedded code/general data depend on the interpreter (set PYTHON=... to choose another)')"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	@# torch is pinned on the command line too, so that no dependency (mergekit, peft, lm-eval) can swap it for
	@# another build; mergekit 0.1.5 comes with the dev extra (pyproject.toml), its requirements all satisfied here
	$(BIN)/pip install --quiet -e ".[dev]" torch==2.13.0

venv: $(BIN)/bts

reproduce: $(BIN)/bts
	$(BIN)/bts reproduce --profile $(PROFILE) --seeds $(SEEDS)

test: $(BIN)/bts
	$(BIN)/python -m pytest

lint: $(BIN)/bts
	$(BIN)/ruff check src tests

clean-runs:
	rm -rf runs/$(PROFILE)
