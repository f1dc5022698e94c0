#!/usr/bin/env bash
# Fetch ZooKeeper 3.9 (Debian 13 "trixie"'s libzookeeper-java) for the tests,
# without touching the machine's apt setup, so the conformance suite runs
# against both Debian 12's ZooKeeper 3.8 (installed) and 3.9.
#
# The archive's URI is the one this machine's apt already uses for its own
# ZooKeeper package (from `apt-get --print-uris`), so no mirror name lives in
# the repository. apt gets private state and cache directories; the .deb is
# unpacked with `dpkg -x` into a cache directory. The jars are Java 8 class
# files and run with this machine's JRE and Debian 12's dependency jars.
# Idempotent: when the jar is already there, nothing is done.
#
#   scripts/fetch-zookeeper.sh [CACHE_DIR]   (default /var/cache/overlayd-test/zookeeper-3.9)
#
# The tests look for $CACHE_DIR/usr/share/java/zookeeper.jar.
set -euo pipefail

cache=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/zookeeper-3.9}
jar="$cache/usr/share/java/zookeeper.jar"
suite=trixie

if [[ -f $jar ]]; then
    exit 0
fi

# 'http://host/debian/pool/main/z/zookeeper/libzookeeper-java_..._all.deb' ... -> http://host/debian
url=$(apt-get --print-uris download libzookeeper-java 2>/dev/null | head -n 1 | cut -d"'" -f2)
uri=${url%%/pool/*}
if [[ -z $url || $uri == "$url" ]]; then
    echo "fetch-zookeeper: apt knows no source for libzookeeper-java (run apt-get update?)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/fetch-zookeeper.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt downloads as user _apt
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/dl"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
opts="[arch=$(dpkg --print-architecture)$([[ -f $keyring ]] && echo " signed-by=$keyring")]"
echo "deb $opts $uri $suite main" >"$work/sources.list"

apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache::archives=$work/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "APT::Get::List-Cleanup=0"
)
echo "fetch-zookeeper: reading $suite from this machine's Debian source" >&2
apt-get -q "${apt_opts[@]}" update >&2
(cd "$work/dl" && apt-get -q "${apt_opts[@]}" download libzookeeper-java >&2)

deb=$(find "$work/dl" -name 'libzookeeper-java_*.deb' | head -n 1)
if [[ -z $deb ]]; then
    echo "fetch-zookeeper: apt-get download libzookeeper-java produced no .deb" >&2
    exit 1
fi
# Unpack next to the target and rename into place, so a half-unpacked tree is never seen.
mkdir -p "$(dirname "$cache")"
staging=$(mktemp -d "$(dirname "$cache")/.zookeeper.XXXXXX")
dpkg -x "$deb" "$staging"
chmod 755 "$staging"
rm -rf "$cache"
mv "$staging" "$cache"
echo "fetch-zookeeper: $(basename "$deb") in $cache" >&2
