# One virtual environment, made and filled from scratch by `make install` (CI does the same).
# torch comes pinned from constraints.txt; norse is installed with --no-deps because its
# declared torchvision requirement pulls a build that does not import (docs/ENVIRONMENT.md).
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

# Lava (the `lava` simulator target) is installed as docs/ENVIRONMENT.md describes: its wheels
# declare Python < 3.11 and torch < 2.4, so they go in with --no-deps beside their real needs
# (numpy < 2 comes pinned from constraints.txt for the whole environment), then
# tools/patch_lava.py fixes var_model.py's dataclass defaults for Python 3.11 (idempotent).
LAVA_STAMP := $(VENV)/.lava-installed
LAVA = 'lava-nc==0.10.0' 'lava-dl==0.6.0'
LAVA_DEPS = 'scipy<2' h5py 'asteval<0.10' networkx matplotlib

# The report test opens the page in a real headless browser: Debian's chromium and its driver.
BROWSER_PACKAGES = chromium chromium-driver
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Other tools' NIR readers, each in its own venv under .venv-interop/<reader>/ (tools/interop/setup.sh,
# pinned versions); tests/test_interop.py runs our exported file in each and compares it with our
# reference. `make test` builds those the README lists as exact, so that CI proves them; all five:
# make interop INTEROP_READERS="norse snntorch sinabs spyx rockpool" (sinabs is AGPL: test-time only).
INTEROP_READERS ?= norse snntorch
INTEROP_ROOT := .venv-interop

.PHONY: install lava browser interop demo test bench clean

install: $(STAMP) $(LAVA_STAMP)

lava: $(LAVA_STAMP)

$(LAVA_STAMP): $(STAMP) tools/patch_lava.py
	$(PIP) install -q -c constraints.txt $(LAVA_DEPS)
	$(PIP) install -q --no-deps --ignore-requires-python $(LAVA)
	$(BIN)/python tools/patch_lava.py
	$(BIN)/python -c "from stars_deploy.targets.lava_sim import import_lava; import_lava()"
	touch $@

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(DEPS)
	$(PIP) install -q --no-deps '$(NORSE)'
	$(PIP) install -q --no-deps -e .
	$(BIN)/python -c "import stars_deploy.cli, norse.torch"
	touch $@

interop: $(INTEROP_READERS:%=$(INTEROP_ROOT)/%/interop.json)

$(INTEROP_ROOT)/%/interop.json: tools/interop/setup.sh
	PYTHON=$(PYTHON) tools/interop/setup.sh $*

demo: install
	$(BIN)/stars-deploy distill

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(BROWSER_PACKAGES))

test: install browser interop
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/objectives.py

clean:
	rm -rf $(VENV) $(INTEROP_ROOT) runs .pytest_cache
