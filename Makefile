PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint soak demo quickstart bench plots peers-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[flask,starlette,postgres,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check reliable integrations tests examples bench
	$(BIN)/ruff format --check reliable integrations tests examples bench
	$(BIN)/mypy --strict reliable integrations

test: lint
	$(BIN)/pytest

# The full chaos soak (minutes): 5,000 jobs on PostgreSQL and on SQLite, workers killed,
# PostgreSQL restarted; reports in tests/soak/reports/.
soak: $(STAMP)
	RELIABLE_SOAK_REPORT=tests/soak/reports $(BIN)/pytest tests/soak -m soak

demo: $(STAMP)
	$(BIN)/python examples/flask_app.py

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

bench: $(STAMP)
	$(BIN)/python -m bench.core

# Charts of bench/results/*.json into docs/images/ and their section of docs/benchmarks.md.
plots: $(STAMP)
	$(BIN)/python -m bench.plots

peers-venv:
	PYTHON=$(PYTHON) bench/peers/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
