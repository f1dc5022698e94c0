# overlayd: `make lab` builds a 3-host lab on this machine, `make test` runs every check.
# Both need root (network namespaces) and a Debian-like system (apt-get).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The lab needs the package alone; the tests add its test extras (pytest, mypy, ...).
LAB_STAMP := $(VENV)/.installed-lab
STAMP := $(VENV)/.installed
LAB_HOSTS ?= 3

.PHONY: setup setup-lab system-packages lab-packages test-deps lab lab-down test lint

# What the lab needs (iproute2, ping, Python's venv) and nothing of the test toolchain.
setup-lab: lab-packages $(LAB_STAMP)

setup: system-packages $(STAMP)

# Both install only what is missing (the table is in the script), so they cost nothing once it is there.
lab-packages:
	@PYTHON=$(PYTHON) scripts/system-packages.sh lab

system-packages:
	@PYTHON=$(PYTHON) scripts/system-packages.sh test

# Re-installed only when pyproject.toml changes. The test install includes the lab's.
$(LAB_STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(LAB_STAMP) $@

lab: setup-lab
	$(BIN)/overlayctl lab down
	$(BIN)/overlayctl lab up --hosts $(LAB_HOSTS)

lab-down: setup-lab
	$(BIN)/overlayctl lab down

lint: setup
	$(BIN)/ruff check overlayd tests
	$(BIN)/mypy overlayd
	$(BIN)/lint-imports

# Servers the tests run that Debian 12 does not package (cached; see the script).
test-deps:
	scripts/fetch-consul.sh
	scripts/fetch-zookeeper.sh
	scripts/fetch-etcd.sh

test: lint test-deps
	$(BIN)/pytest -q
