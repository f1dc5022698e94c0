#!/usr/bin/env bash
# ZooKeeper 3.9 (Debian 13 "trixie"'s libzookeeper-java) for the tests, so the
# conformance suite runs against Debian 12's ZooKeeper 3.8 (installed) and 3.9.
# The jars are Java 8 class files and run with this machine's JRE and Debian
# 12's dependency jars.
#
#   scripts/fetch-zookeeper.sh [CACHE_DIR]   (default /var/cache/overlayd-test/zookeeper-3.9)
#
# The tests look for $CACHE_DIR/usr/share/java/zookeeper.jar.
set -euo pipefail
cache=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/zookeeper-3.9}
exec "$(dirname "$0")/fetch-deb.sh" trixie libzookeeper-java "$cache" usr/share/java/zookeeper.jar
