# cifar_kit: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+, git, make).
SHELL := /bin/bash
# The tests run two processes at once on every core: with torch's default (spinning) OpenMP threads, a pre-empted
# thread stalls every small op, so the test targets wait passively (see benchmarks/README.md).
TEST_ENV := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-docs demo test export clean-check lint nbtest pytest browser-deps gpu-check docs site floors

# Install into .venv with the tested pins; redone only when pyproject.toml or constraints.txt change.
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import cifar_kit, torch, torchvision, nbdev, papermill" 
	@touch $(STAMP)

# The site's tools too (the `docs` extra): mkdocs, Material, mkdocstrings, latex2mathml; redone like `install`.
DOCS_STAMP := $(VENV)/.installed-docs
install-docs: $(DOCS_STAMP)
$(DOCS_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,docs]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python, latex2mathml, nbclient, yaml"
	@touch $(DOCS_STAMP)

# The main job on the offline default data set.
demo: install
	$(BIN)/cifar-kit demo

# Notebooks and package in sync, notebooks clean, then every test. `site` runs every notebook at the tests' size, as
# `nbtest` does (the same cells, so it fails where nbtest fails), and tests/test_site.py then checks the site it built.
test: install browser-deps export clean-check lint site pytest

# Chromium and its driver for tests/test_browser.py, from Debian, when missing and installable; otherwise that test skips.
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "browser-deps: no apt-get; tests/test_browser.py will skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "browser-deps: not root and no passwordless sudo; tests/test_browser.py will skip"; exit 0; fi; \
	echo "browser-deps: installing chromium and chromium-driver"; \
	( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null ) \
	  || echo "browser-deps: apt-get could not install chromium; tests/test_browser.py will skip"

# nbdev-export must leave pyproject.toml alone (even its mtime: the install stamp depends on it)
PYPROJECT_STATE = $(BIN)/python -c 'import hashlib, os; print(os.stat("pyproject.toml").st_mtime_ns, hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'

export:
	@git diff --quiet -- cifar_kit; before=$$?; \
	proj=$$($(PYPROJECT_STATE)); \
	$(BIN)/nbdev-export; \
	if [ "$$proj" != "$$($(PYPROJECT_STATE))" ]; then \
	  echo "nbdev-export rewrote pyproject.toml: set update_pyproject = false in its [tool.nbdev] table."; exit 1; fi; \
	if [ $$before = 0 ] && ! git diff --quiet -- cifar_kit; then \
	  echo "nbdev-export changed cifar_kit/: the package is out of sync with nbs/. Commit the exported files."; git diff --stat -- cifar_kit; exit 1; fi; \
	if [ -n "$$(git status --porcelain --untracked-files=all -- cifar_kit)" ] && [ $$before = 0 ]; then \
	  echo "nbdev-export created files under cifar_kit/ that are not committed:"; git status --short -- cifar_kit; exit 1; fi

clean-check:
	@ignored=$$(git ls-files -ci --exclude-standard); \
	if [ -n "$$ignored" ]; then echo ".gitignore matches tracked files (narrow the pattern or untrack them): $$ignored"; exit 1; fi
	@git diff --quiet -- nbs reproductions benchmarks; before=$$?; \
	$(BIN)/nbdev-clean; $(BIN)/nbdev-clean --fname reproductions; $(BIN)/nbdev-clean --fname benchmarks; \
	if [ $$before = 0 ] && ! git diff --quiet -- nbs reproductions benchmarks; then \
	  echo "nbdev-clean changed notebooks: commit them cleaned (no outputs)."; git diff --stat -- nbs reproductions benchmarks; exit 1; fi

# The package at one width (120), no unused import, no undefined name: ruff with [tool.ruff] of pyproject.toml (tests/test_lint.py)
lint:
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_lint.py

nbtest:
	$(TEST_ENV) CIFAR_KIT_LESSON=ci $(BIN)/nbdev-test --n-workers 2 --timing

# The course site from the notebooks, run at build time (docs/build.py): `make docs` at the lessons' full size, one
# notebook at a time in a fresh kernel, as a student runs it; it records their results and minutes (each lesson's time
# on a quiet machine) in docs/results/course.json;
# `make site` at the tests' size, also a fresh kernel per notebook (a shared one let one notebook's registrations
# leak into the next), writing nothing git tracks. Both write _site/ (serve it: `python -m http.server -d _site`)
# and check that it loads nothing from the internet.
SITE_FLAGS ?=
docs: install-docs
	$(TEST_ENV) $(BIN)/python docs/build.py --size full --jobs 1 --fresh-kernels $(SITE_FLAGS)

site: install-docs
	$(TEST_ENV) $(BIN)/python docs/build.py --size ci --jobs 2 --fresh-kernels $(SITE_FLAGS)

# The lowest version of every declared dependency, in a fresh venv (.venv-floors), through a smoke subset of the tests.
floors:
	$(TEST_ENV) $(PYTHON) tests/floors.py

# Two worker processes (pytest-xdist), a test file per worker at a time: many tests wait on a child process (a run, a
# signal, a lock holder), so two files at once fill the cores. PYTEST_WORKERS=0 runs them in this one process.
PYTEST_WORKERS ?= 2
pytest:
	$(TEST_ENV) $(BIN)/python -m pytest $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) tests

# The whole GPU path in one command (benchmarks/gpu_check.py, ~7 min on one GPU; record in benchmarks/results/). Without
# CUDA it runs its dry mode (CPU, tiny sizes), which `make test` also runs (tests/test_gpu_check.py). No install step: a GPU
# machine keeps its own torch (GPU_PYTHON=python3 there; benchmarks/wheels.sh carries fastcore for a machine offline).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
