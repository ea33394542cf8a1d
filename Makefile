# make demo  - start everything on this machine, push sample payments, print what happened, stop everything
# make test  - the whole suite (unit, integration against real Redis/Celery/HTTP, reliability)
# make lint  - ruff (lint + format check) and mypy
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

venv: $(VENV)/.installed

# constraints.txt pins every package (direct and transitive) so each install is the same.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/stkpush demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file to a process: its tests mostly wait on real
# stacks (windows, callbacks, outages), so three share two cores well. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/guard.py
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/webhooks.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
