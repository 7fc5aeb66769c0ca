# Two commands for a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint demo bench install clean system-deps

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The sqlite3 program and systemd-analyze are used by the tests (audit queries,
# unit verification); install them from the distribution when they are missing.
system-deps:
	@command -v sqlite3 >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 || \
	  { echo "installing sqlite3 and systemd from the distribution"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 systemd >/dev/null; }

lint: venv
	$(VENV)/bin/ruff check supervisord_ms client tests bench scripts

test: venv system-deps lint
	$(VENV)/bin/pytest -q -m "not slow"

test-all: venv system-deps
	$(VENV)/bin/pytest -q

demo: venv
	$(PY) -m supervisord_ms.cli demo

bench: venv system-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo-run bench/work
