# Two entry points for a fresh machine with Python 3.11+: `make demo` and `make test`.
# Each creates .venv on first use and installs poller into it. The packages are installed by uv
# (installed into .venv first), which fetches them side by side: several times faster than pip.
# They are compiled to bytecode as they are installed, as pip does, and so is poller itself: each
# `poller` process then starts without compiling its imports (with PYTHONDONTWRITEBYTECODE set,
# it would compile them again at every start).
PYTHON ?= python3
VENV ?= .venv
INSTALL = $(VENV)/bin/pip install --quiet --disable-pip-version-check uv && \
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python

.PHONY: help demo test bench

# `make` alone (the first target) lists the targets, each with the `##` note after its name.
help: ## list these targets
	@awk -F ':.*## ' '/^[a-z]+:.*## / {printf "  make %-6s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## install into .venv, then send a small campaign (embedded MongoDB, WAHA simulator)
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) -e '.[demo]'
	$(VENV)/bin/python -m compileall -q poller
	$(VENV)/bin/poller demo

# The tests run in one worker process per CPU (pytest-xdist); `make test PYTEST_WORKERS=0` runs
# them in one process. The tests marked slow are left out (pyproject.toml): `make test
# PYTEST_ARGS='-m slow'` runs only them, `PYTEST_ARGS='-m ""'` everything.
PYTEST_WORKERS ?= auto

test: ## install into .venv with the test tools, then run the tests
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) -e '.[test]'
	$(VENV)/bin/python -m compileall -q poller
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# poller against the reference design; rewrites the results in docs/benchmarks.md (~10 min).
bench: ## compare poller with the reference design; rewrites docs/benchmarks.md (~10 min)
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) -e '.[bench]'
	$(VENV)/bin/python benchmarks/compare.py --report docs/benchmarks.md
