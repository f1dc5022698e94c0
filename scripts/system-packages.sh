#!/usr/bin/env bash
# The Debian packages overlayd's lab and tests need, in one table, and their installation.
#
#   scripts/system-packages.sh lab|test            install what the group needs and is missing
#   scripts/system-packages.sh --missing lab|test  print what is missing, install nothing
#   scripts/system-packages.sh --list lab|test     print the group's packages, installed or not
#
# `lab` is what `overlayctl lab up` runs (the default gossip lab: namespaces with
# iproute2, pings, and the daemons in a Python venv); `test` is the lab's plus the
# test toolchain (KV servers, nftables, podman, ...). `make lab` installs the first,
# `make test` and .ci/run the second. PYTHON names the interpreter (default python3).
set -euo pipefail

python=${PYTHON:-python3}

# group | package | shell test that is true when it is there
table=(
    "lab|python3|command -v $python"
    "lab|python3-venv|$python -c 'import ensurepip, venv'"
    "lab|iproute2|command -v ip && command -v bridge"
    "lab|iputils-ping|command -v ping"
    "test|nftables|command -v nft"
    "test|tcpdump|command -v tcpdump"
    "test|etcd-server|[ -x /usr/bin/etcd ] || command -v etcd"
    "test|etcd-client|command -v etcdctl"
    "test|zookeeper|[ -f /usr/share/java/zookeeper.jar ]"
    "test|default-jre-headless|command -v java"
    "test|systemd|command -v systemd-analyze"
    "test|docker-compose|command -v docker-compose"
    "test|podman|command -v podman"
    "test|runc|command -v runc"
    "test|busybox-static|dpkg -s busybox-static"
    "test|containernetworking-plugins|dpkg -s containernetworking-plugins"
    "test|systemd-container|command -v systemd-nspawn"
    "test|debootstrap|command -v debootstrap"
    "test|iperf3|command -v iperf3"
    "test|libfaketime|dpkg -s libfaketime"
    "test|golang-github-containernetworking-plugin-dnsname|[ -x /usr/lib/cni/dnsname ]"
)

usage() {
    echo "usage: $0 [--missing|--list] lab|test" >&2
    exit 2
}

mode=install
case "${1:-}" in
    --missing | --list)
        mode=${1#--}
        shift
        ;;
esac
group=${1:-}
case "$group" in
    lab) groups=" lab " ;;
    test) groups=" lab test " ;; # the tests build labs too
    *) usage ;;
esac

wanted=()
for row in "${table[@]}"; do
    IFS='|' read -r row_group package check <<<"$row"
    [[ $groups == *" $row_group "* ]] || continue
    if [[ $mode == list ]] || ! (eval "$check") >/dev/null 2>&1; then
        wanted+=("$package")
    fi
done

if [[ $mode != install ]]; then
    if ((${#wanted[@]})); then
        printf '%s\n' "${wanted[@]}"
    fi
    exit 0
fi
if ((${#wanted[@]})); then
    echo "installing for the $group: ${wanted[*]}" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${wanted[@]}"
fi
