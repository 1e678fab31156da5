# One virtual environment, made and filled from scratch by `make install` (CI does the same).
# torch comes pinned from constraints.txt; norse is installed with --no-deps because its
# declared torchvision requirement pulls a build that does not import (docs/ENVIRONMENT).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
# pyproject's dependencies and test extra, without norse (installed on its own below)
DEPS = $(shell $(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(' '.join(repr(d) for d in p['dependencies'] + p['optional-dependencies']['test'] if not d.startswith('norse')))")
NORSE = $(shell $(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(next(d for d in p['dependencies'] if d.startswith('norse')))")

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(DEPS)
	$(PIP) install -q --no-deps '$(NORSE)'
	$(PIP) install -q --no-deps -e .
	$(BIN)/python -c "import stars_deploy.cli, norse.torch"
	touch $@

demo: install
	$(BIN)/stars-deploy distill

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/objectives.py

clean:
	rm -rf $(VENV) runs .pytest_cache
