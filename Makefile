# overlayd: `make lab` builds a 3-host lab on this machine, `make test` runs every check.
# Both need root (network namespaces) and a Debian-like system (apt-get).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB_HOSTS ?= 3

.PHONY: setup system-packages test-deps lab lab-down test lint

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
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	[ -x /usr/lib/cni/dnsname ] || missing="$$missing golang-github-containernetworking-plugin-dnsname"; \
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
	$(BIN)/ruff check overlayd tests
	$(BIN)/mypy overlayd

# Servers the tests run that Debian 12 does not package, and the Debian rootfs the
# systemd and compose tests boot and build on (cached; see the scripts).
test-deps:
	scripts/fetch-consul.sh
	scripts/fetch-zookeeper.sh
	scripts/fetch-etcd.sh
	scripts/fetch-rootfs.sh

test: lint test-deps
	$(BIN)/pytest -q
