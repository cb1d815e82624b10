# Two-command set-up: `make demo` and `make test` each create .venv when absent and install into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: demo test lint format clean mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lesiondiffusion demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mutation score of the core modules named in setup.cfg [mutmut] (slow; not part of CI)
mutation: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run || true
	$(BIN)/python benchmarks/mutation_score.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache mutants
