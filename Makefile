# overlayd: `make lab` builds a 3-host lab on this machine, `make test` runs every check.
# Both need root (network namespaces) and a Debian-like system (apt-get).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB_HOSTS ?= 3

.PHONY: setup system-packages test-deps lab lab-down test lint bench bench-quick bench-deps

setup: system-packages $(STAMP)

# Installs only what is missing, so it costs nothing once everything is there.
system-packages:
	@missing=""; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v ping >/dev/null 2>&1 || missing="$$missing iputils-ping"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	[ -x /usr/bin/etcd ] || command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	[ -f /usr/share/java/zookeeper.jar ] || missing="$$missing zookeeper"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v podman >/dev/null 2>&1 || missing="$$missing podman"; \
	command -v runc >/dev/null 2>&1 || missing="$$missing runc"; \
	dpkg -s busybox-static >/dev/null 2>&1 || missing="$$missing busybox-static"; \
	dpkg -s containernetworking-plugins >/dev/null 2>&1 || missing="$$missing containernetworking-plugins"; \
	command -v $(PYTHON) >/dev/null 2>&1 || missing="$$missing python3"; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# Re-installed only when pyproject.toml changes.
$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lab: setup
	$(BIN)/overlayctl lab down
	$(BIN)/overlayctl lab up --hosts $(LAB_HOSTS)

lab-down: setup
	$(BIN)/overlayctl lab down

lint: setup
	$(BIN)/ruff check overlayd tests bench
	$(BIN)/mypy overlayd bench

# Servers the tests run that Debian 12 does not package (cached; see the script).
test-deps:
	scripts/fetch-consul.sh
	scripts/fetch-zookeeper.sh
	scripts/fetch-etcd.sh

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
