#!/usr/bin/env bash
# Entry point for a fresh Debian machine (as root): `./dev.sh lab` or `./dev.sh test`.
# Installs the two things `make` itself cannot (make and Python's venv), then
# hands over to the Makefile, which installs the rest only where it is missing.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v make >/dev/null 2>&1 || missing+=(make)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

case "${1:-}" in
    lab | lab-down | test | lint | setup) exec make "$1" ;;
    *)
        echo "usage: ./dev.sh lab|lab-down|test|lint|setup" >&2
        exit 2
        ;;
esac
