# overlayd: `make lab` builds a 3-host lab on this machine, `make test` runs every check.
# Both need root (network namespaces) and a Debian-like system (apt-get).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The lab needs the package alone; the tests add its test extras (pytest, mypy, ...).
LAB_STAMP := $(VENV)/.installed-lab
STAMP := $(VENV)/.installed
LAB_HOSTS ?= 3

.PHONY: setup setup-lab system-packages lab-packages test-deps lab lab-down test lint bench bench-quick bench-deps faults faults-short

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
	$(BIN)/ruff check overlayd tests bench faults
	$(BIN)/mypy overlayd bench faults
	$(BIN)/lint-imports

# Servers the tests run that Debian 12 does not package, and the Debian rootfs the
# systemd and compose tests boot and build on (cached; see the scripts).
test-deps:
	scripts/fetch-consul.sh
	scripts/fetch-zookeeper.sh
	scripts/fetch-etcd.sh
	scripts/fetch-rootfs.sh

test: lint test-deps
	$(BIN)/pytest -q

# Benchmarks (root; see bench/__init__.py): `make bench` runs every one at full scale
# (under 15 minutes on 2 cores) and writes bench/results/latest.json and latest.png;
# `make bench-quick` runs the same code at small scale (quick.json, quick.png).
BENCH_STAMP := $(VENV)/.bench-installed

# iperf3 for the dataplane benchmark, Consul for its labs (cached; see the script).
bench-deps: setup
	@command -v iperf3 >/dev/null 2>&1 || { \
		echo "installing: iperf3"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iperf3; \
	}
	scripts/fetch-consul.sh

# The bench extra (matplotlib) goes into the venv only here.
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: bench-deps $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: bench-deps $(BENCH_STAMP)
	$(BIN)/python -m bench --quick

# The fault suite (root; see faults/__init__.py): `make faults` runs every scenario of
# issue 9 on every backend it applies to, prints the table and writes
# faults/results/latest.json (commit it with each change to the suite);
# `make faults-short` runs each scenario once (what CI runs inside `make test`).
faults: setup test-deps
	$(BIN)/python -m faults

faults-short: setup test-deps
	$(BIN)/python -m faults --short
