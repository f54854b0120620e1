# Two commands: `make run` (install and start the node) and `make test` (install and test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-dev system-deps lint unit

run: install
	$(BIN)/cxr-node serve

install: $(VENV)/.stamp-runtime

$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

install-dev: $(VENV)/.stamp-dev

$(VENV)/.stamp-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	touch $@

system-deps:
	deploy/install-system-deps.sh

lint: install-dev
	$(BIN)/ruff check dicom_node worker training tests bench
	$(BIN)/mypy

test: system-deps install-dev lint
	$(BIN)/python -m pytest

unit: install-dev
	$(BIN)/python -m pytest -m "not integration and not slow"
