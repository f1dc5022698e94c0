#!/usr/bin/env bash
# A Debian root filesystem for the systemd and compose tests, made with
# debootstrap through this machine's own apt source and cached:
#
#   scripts/fetch-rootfs.sh [DEST]    (default /var/cache/overlayd-test/rootfs-<codename>)
#
# The release is this machine's (VERSION_CODENAME in /etc/os-release): the
# systemd test runs a venv built with this machine's /usr/bin/python3 on the
# rootfs's python3, so both must be the same Python. It holds what those tests
# run and nothing more: systemd as PID 1 for systemd-nspawn, python3 for the
# venv, iproute2 and ping; python3-venv as well, so the compose test's build of
# deploy/Dockerfile (which installs it) downloads nothing it does not need to.
#
# The archive URI is the one this machine's apt already uses (from
# `apt-get --print-uris` of a package every Debian has, as in fetch-deb.sh), so
# no mirror name lives in the repository. The tree is made next to DEST and
# renamed into place, so a half-made tree is never used. Idempotent: if
# DEST/.overlayd-rootfs exists, nothing is done. The tests never write to it
# (nspawn boots it with --volatile=overlay; podman imports a tar of it).
set -euo pipefail

# shellcheck disable=SC1091  # the machine's, not ours
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [[ -z $codename ]]; then
    echo "fetch-rootfs: /etc/os-release names no VERSION_CODENAME" >&2
    exit 1
fi
dest=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/rootfs-$codename}
marker=.overlayd-rootfs
packages=systemd,systemd-sysv,python3,python3-venv,iproute2,iputils-ping

if [[ -e $dest/$marker ]]; then
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "fetch-rootfs: debootstrap not found: apt-get install debootstrap" >&2
    exit 1
fi

# 'http://host/debian/pool/main/b/base-files/base-files_..._amd64.deb' ... -> http://host/debian
url=$(apt-get --print-uris download base-files 2>/dev/null | head -n 1 | cut -d"'" -f2)
uri=${url%%/pool/*}
if [[ -z $url || $uri == "$url" ]]; then
    echo "fetch-rootfs: apt knows no Debian source here (run apt-get update first?)" >&2
    exit 1
fi

mkdir -p "$(dirname "$dest")"
staging=$(mktemp -d "$(dirname "$dest")/.rootfs.XXXXXX")
log=$(mktemp /tmp/fetch-rootfs.XXXXXX.log)
trap 'rm -rf "$staging" "$log"' EXIT
keyring_opt=()
if [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
    keyring_opt=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi
echo "fetch-rootfs: debootstrap $codename from $uri into $dest" >&2
start=$SECONDS
if ! debootstrap --variant=minbase --include="$packages" "${keyring_opt[@]}" \
    "$codename" "$staging" "$uri" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    exit 1
fi
# The downloaded .debs and package lists: only size here (an image build runs
# apt-get update itself).
rm -rf "$staging"/var/cache/apt/archives/*.deb "$staging"/var/lib/apt/lists/*
# systemd-nspawn gives each boot a machine ID of its own when this is empty.
: >"$staging/etc/machine-id"
chmod 755 "$staging"
touch "$staging/$marker"
rm -rf "$dest"
mv "$staging" "$dest"
echo "fetch-rootfs: $codename in $dest ($((SECONDS - start)) s, $(du -sh "$dest" | cut -f1))" >&2
