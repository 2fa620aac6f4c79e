# Entry points: `make run`, `make test` and `make lint` (CI runs lint, then test). Each
# creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/clustersim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/clustersim
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/clustersim
	$(BIN)/clustersim run

test: $(VENV)/.test-extras
	$(BIN)/pytest

lint: $(VENV)/.test-extras
	$(BIN)/ruff check clustersim tests benchmarks
	$(BIN)/ruff format --check clustersim tests benchmarks
	$(BIN)/lint-imports

bench: $(VENV)/.test-extras
	$(BIN)/pytest -m slow benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
