# The two commands README.md opens with:
#   make run    — set up a venv and run empath in the foreground on examples/dev.yaml
#   make test   — install everything the tests need (apt + pip) and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test venv deps lint typecheck pytest system-test bench bench-relay clean packages molecule bench-suite

$(BIN)/empath: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/empath

run: venv
	$(BIN)/empath run --config examples/dev.yaml

deps:
	scripts/install-test-deps

lint: venv
	$(BIN)/ruff check empath tests bench

typecheck: venv
	$(BIN)/mypy

# The whole suite in one run, the system tests (tests/system: empath under a real
# systemd booted with systemd-nspawn, needs root) included; scripts/system-rootfs
# builds their cached Debian 12 rootfs first (about a minute the first time).
pytest: venv
	scripts/system-rootfs
	$(BIN)/pytest

test: deps venv lint typecheck pytest molecule

# The Ansible role: ansible-lint (production profile) and every Molecule scenario
# (default, reload, fleet) against booted Debian 12 containers, each in its own
# network namespace; builds its own .debs from this checkout.
molecule:
	scripts/molecule-test

# Only the system tests.
system-test: venv
	scripts/system-rootfs
	$(BIN)/pytest tests/system

# empath_<version>_all.deb and empath-<version>-1.noarch.rpm in dist/, checked with
# lintian (no errors or warnings) and rpmlint (no errors); scripts/build-packages.
packages:
	scripts/build-packages

bench: venv
	$(BIN)/python bench/accept.py --empath-cmd "$(abspath $(BIN))/empath"
	$(BIN)/python bench/relay.py --empath-cmd "$(abspath $(BIN))/empath"

# Everything against Postfix in one run (accept w=1,2,4, relay, latency, recovery of
# 100,000 messages, memory bounds): a table, and JSON under bench/results/.
bench-suite: venv
	$(BIN)/python bench/suite.py --empath-cmd "$(abspath $(BIN))/empath"

bench-relay: venv
	$(BIN)/python bench/relay.py --empath-cmd "$(abspath $(BIN))/empath"

clean:
	rm -rf $(VENV) examples/dev-state build dist *.egg-info
