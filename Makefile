# Two commands for a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint demo demo-up demo-down env bench install clean system-deps

INSTALL_VENV ?= /opt/modelserverd
INSTALL_EXTRAS ?=
# The service user must be able to run this interpreter: the distribution's, not
# one under a home directory.
INSTALL_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)

# client/ is installed as ms_client (setup.cfg, package_dir), so setuptools serves the
# editable install through an import hook rather than a plain .pth entry, and says so
# with an "Editable installation" notice that pip prints even with --quiet. Nothing is
# wrong; that one notice is filtered (see setup.cfg for the layout it would need).
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The tests use the sqlite3 program (audit queries), systemd-analyze and
# systemd-sysusers (unit checks) and curl (the API over the socket); install them
# from the distribution when they are missing.
system-deps:
	@command -v sqlite3 >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 && \
	  command -v systemd-sysusers >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || \
	  { echo "installing sqlite3, systemd and curl from the distribution"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq sqlite3 systemd curl >/dev/null; }

lint: venv
	$(VENV)/bin/ruff check supervisord_ms client tests bench scripts

# Two workers: most end-to-end tests wait on real processes, so two run side by
# side on two cores in about half the time.
test: venv system-deps lint
	$(VENV)/bin/pytest -q -m "not slow" -n 2

test-all: venv system-deps
	$(VENV)/bin/pytest -q

# Checks a running SGLang server against what modelserverd relies on (docs/sglang.md):
#   make conformance SGLANG_URL=http://127.0.0.1:30000 [CONFORMANCE_OUT=dir]
.PHONY: conformance
conformance: venv
	SGLANG_URL="$(SGLANG_URL)" CONFORMANCE_OUT="$(CONFORMANCE_OUT)" $(VENV)/bin/pytest -q tests/conformance

demo: venv
	$(PY) -m supervisord_ms.cli demo
	@echo "To use the tools by name: source $(VENV)/bin/activate"

# The demo's daemon and servers stay up for trying things by hand; demo-down stops them.
demo-up: venv
	$(PY) -m supervisord_ms.cli demo --keep-running

demo-down: venv
	$(PY) -m supervisord_ms.cli demo --stop

# For a shell: prints the line that puts modelserverd and ms-client on PATH.
env: venv
	@echo "source $(VENV)/bin/activate"

# bench/run.py installs the peer it compares with (sglang-router) into the venv.
bench: venv system-deps
	$(PY) bench/run.py
	$(VENV)/bin/pytest -q -m slow tests/test_faults.py

# Installs the daemon on a host: its own venv (Debian refuses a system-wide pip),
# the unit, the modelserver user and group, and an example config (never overwritten).
install:
	@test "$$(id -u)" = 0 || { echo "make install must run as root"; exit 1; }
	$(INSTALL_PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install --quiet --upgrade pip
	$(INSTALL_VENV)/bin/pip install --quiet ".$(INSTALL_EXTRAS)"
	ln -sf $(INSTALL_VENV)/bin/modelserverd /usr/local/bin/modelserverd
	ln -sf $(INSTALL_VENV)/bin/ms-client /usr/local/bin/ms-client
	install -D -m 0644 systemd/modelserverd.service /usr/local/lib/systemd/system/modelserverd.service
	install -D -m 0644 systemd/modelserverd.sysusers /usr/local/lib/sysusers.d/modelserverd.conf
	install -D -m 0644 docs/systemd.md /usr/local/share/doc/modelserverd/systemd.md
	install -d -m 0755 /etc/modelserverd
	test -e /etc/modelserverd/config.toml || install -m 0644 examples/config.toml /etc/modelserverd/config.toml
	systemd-sysusers /usr/local/lib/sysusers.d/modelserverd.conf
	systemctl daemon-reload || echo "systemd is not running here: run 'systemctl daemon-reload' on the host"
	@echo "next: edit /etc/modelserverd/config.toml; modelserverd check-config; systemctl enable --now modelserverd"

clean:
	rm -rf $(VENV) build dist *.egg-info demo-run bench/work
