#!/usr/bin/env bash
# Unpack one package of another Debian release for the tests, without touching
# the machine's apt setup:
#
#   scripts/fetch-deb.sh SUITE PACKAGE DEST MARKER
#
# e.g. `fetch-deb.sh trixie etcd-server /var/cache/overlayd-test/etcd-3.5 usr/bin/etcd`.
#
# The archive URI is the one this machine's apt already uses (from
# `apt-get --print-uris` of a package every Debian has), so no mirror name
# lives in the repository. apt gets a private sources list, state and cache;
# the .deb is unpacked with `dpkg -x` next to DEST and renamed into place, so
# a half-unpacked tree is never seen. Idempotent: if DEST/MARKER exists,
# nothing is done.
set -euo pipefail

if (($# != 4)); then
    echo "usage: $0 SUITE PACKAGE DEST MARKER" >&2
    exit 2
fi
suite=$1 package=$2 dest=$3 marker=$4

if [[ -e $dest/$marker ]]; then
    exit 0
fi

# 'http://host/debian/pool/main/b/base-files/base-files_..._amd64.deb' ... -> http://host/debian
url=$(apt-get --print-uris download base-files 2>/dev/null | head -n 1 | cut -d"'" -f2)
uri=${url%%/pool/*}
if [[ -z $url || $uri == "$url" ]]; then
    echo "fetch-deb: apt knows no Debian source here (run apt-get update first?)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/fetch-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt downloads as user _apt
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/dl"
chmod 777 "$work/dl" # and saves it there
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
echo "fetch-deb: $package from $suite, through this machine's Debian source" >&2
apt-get -q "${apt_opts[@]}" update >&2
(cd "$work/dl" && apt-get -q "${apt_opts[@]}" download "$package" >&2)

deb=$(find "$work/dl" -name "${package}_*.deb" | head -n 1)
if [[ -z $deb ]]; then
    echo "fetch-deb: apt-get download $package produced no .deb" >&2
    exit 1
fi
mkdir -p "$(dirname "$dest")"
staging=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
dpkg -x "$deb" "$staging"
chmod 755 "$staging"
if [[ ! -e $staging/$marker ]]; then
    echo "fetch-deb: $(basename "$deb") has no $marker" >&2
    rm -rf "$staging"
    exit 1
fi
rm -rf "$dest"
mv "$staging" "$dest"
echo "fetch-deb: $(basename "$deb") in $dest" >&2
