# MediMesh: `make demo` runs the local federation, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test bench lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "MediMesh needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/medimesh demo $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/medimesh bench accuracy --dataset rare --hospitals 8 --rounds 20 --seed 0 --json
	$(BIN)/medimesh bench rounds --hospitals 10 --rounds 30 --json
	$(BIN)/medimesh bench rounds --hospitals 50 --rounds 30 --json
	$(BIN)/medimesh bench chaos --json

clean:
	rm -rf $(VENV) .medimesh .mypy_cache .pytest_cache .ruff_cache build *.egg-info
