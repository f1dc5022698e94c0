#!/usr/bin/env bash
# etcd 3.5 (Debian 13 "trixie"'s etcd-server) for the tests, so the conformance
# suite runs against Debian 12's etcd 3.4 (installed) and 3.5. Before 3.4.31 /
# 3.5.13 etcd could lose watch events around compaction; 3.4.23 has that bug.
#
#   scripts/fetch-etcd.sh [CACHE_DIR]   (default /var/cache/overlayd-test/etcd-3.5)
#
# The tests look for $CACHE_DIR/usr/bin/etcd.
set -euo pipefail
cache=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/etcd-3.5}
exec "$(dirname "$0")/fetch-deb.sh" trixie etcd-server "$cache" usr/bin/etcd
