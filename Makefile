# The README's commands: `make demo` (the main job end to end), `make test`, and
# `make cluster` (the same load through HAProxy, several app hosts and PgBouncer).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test cluster lint bench profile cluster-bench bench-client clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	scripts/demo.sh $(ARGS)

cluster: $(VENV)/.installed
	scripts/cluster.sh $(ARGS)

# The suite as four lanes side by side (tests/conftest.py: LANES).
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -n 4

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.suite
	$(PY) -m bench.scale

# A flame graph of one worker under load (bench/profile.py; ARGS="--route /todos --seconds 20").
profile: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.profile $(ARGS)

cluster-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.cluster_bench

# The load tester against wrk2 (skipped without it: bench/client.py says how to build it).
bench-client: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || (apt-get update -qq && apt-get install -y -qq haproxy)
	$(PY) -m bench.client

clean:
	-$(PY) -m greenflask.embedded stop
	rm -rf $(VENV) .pgdata .pytest_cache .ruff_cache .hypothesis
