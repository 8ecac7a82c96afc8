# vmctl: everything a developer or CI needs, from a fresh clone.
#   make run    set up .venv and start the agent on /run/vmctl/agent.sock (root)
#   make test   lint, then the whole suite (root: it reads other processes and sets up zram swap)
#   make test-unprivileged  the tests that need no root (parsers, policy, cookie, limits, views), as any user
#   make proto  regenerate the Python stubs from proto/
#   make bench  (see bench/README.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
AGENT_ARGS  ?=
BENCH_ARGS  ?=

.PHONY: setup run test test-unprivileged lint proto bench clean

$(STAMP): pyproject.toml setup.py $(wildcard src/vmctl_server/backends/native/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/vmctl-agent $(AGENT_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/mypy --strict src/vmctl_client src/vmctl_api

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unprivileged: $(STAMP)
	$(PY) -m pytest -m unprivileged $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# A few minutes, as root; BENCH_ARGS="--reps 25 --big-reps 11" for tighter medians.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/vmctl_server/backends/native/_native*.so .pytest_cache .hypothesis .mypy_cache
