# Two entry points for a fresh machine with Python 3.11+: `make demo` and `make test`.
# Each creates .venv on first use and installs poller into it.
PYTHON ?= python3
VENV ?= .venv

.PHONY: demo test bench

demo:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[demo]'
	$(VENV)/bin/poller demo

# The tests run in one worker process per CPU (pytest-xdist); `make test PYTEST_WORKERS=0` runs
# them in one process. The tests marked slow are left out (pyproject.toml): `make test
# PYTEST_ARGS='-m slow'` runs only them, `PYTEST_ARGS='-m ""'` everything.
PYTEST_WORKERS ?= auto

test:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# poller against the reference design; rewrites the results in docs/benchmarks.md (~10 min).
bench:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(VENV)/bin/python benchmarks/compare.py --report docs/benchmarks.md
