#!/usr/bin/env bash
# Consul 1.8.7 from Debian 11 (bullseye) for the tests: Debian 12 has no consul
# package, and bullseye's is a real agent that runs here.
#
#   scripts/fetch-consul.sh [CACHE_DIR]     (default /var/cache/overlayd-test/consul)
#
# The tests look for $CACHE_DIR/usr/bin/consul (OVERLAYD_CONSUL_BIN overrides).
set -euo pipefail
cache=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/consul}
exec "$(dirname "$0")/fetch-deb.sh" bullseye consul "$cache" usr/bin/consul
