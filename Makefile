# Quick start: `make demo` (pretrain on the built-in MNI152 data) and `make test` (the test suite).
# Both create the virtual environment in .venv and install what they need first; re-running skips the install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install data demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Real evaluation data from Debian: Fashion-MNIST (the 2D check) and Colin27 with the AAL atlas (cross-subject
# probes). Installed with apt-get when missing (as root, or through sudo).
EVAL_DATA := /usr/share/datasets/fashion-mnist /usr/share/mricron/templates
data:
	@missing=0; for d in $(EVAL_DATA); do [ -d $$d ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist mricron-data; \
	fi

demo: install data
	$(BIN)/python scripts/pretrain.py

test: install data
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python scripts/benchmark.py all

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
