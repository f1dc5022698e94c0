#!/usr/bin/env bash
# Fetch Consul 1.8.7 from Debian 11 (bullseye) for the tests, without touching
# the machine's apt setup.
#
# Debian 12 has no consul package; bullseye's is a real agent that runs here.
# We build a private sources list that reuses the URI of this machine's own
# Debian archive (read from its apt sources, so no mirror name lives in the
# repository), point apt at private state and cache directories, download the
# .deb and unpack it with `dpkg -x` into a cache directory. Idempotent: when
# the binary is already there, nothing is done.
#
#   scripts/fetch-consul.sh [CACHE_DIR]     (default /var/cache/overlayd-test/consul)
#
# The tests look for $CACHE_DIR/usr/bin/consul (OVERLAYD_CONSUL_BIN overrides).
set -euo pipefail

cache=${1:-${OVERLAYD_TEST_CACHE:-/var/cache/overlayd-test}/consul}
binary="$cache/usr/bin/consul"
suite=bullseye

if [[ -x $binary ]]; then
    exit 0
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

# Print "URI<TAB>SIGNED-BY" of the first Debian source whose suites include the
# machine's own release (the main archive, not -security or -updates or a
# third-party repository). Reads deb822 *.sources and one-line *.list files.
find_source() {
    local files=()
    if [[ -f /etc/apt/sources.list ]]; then files+=(/etc/apt/sources.list); fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [[ -f $f ]]; then files+=("$f"); fi
    done
    ((${#files[@]})) || return 1
    awk -v want="$codename" '
        function flush(   n, i, s, u) {
            if (!done && uris != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
                n = split(suites, s, /[ \t]+/)
                for (i = 1; i <= n; i++) if (s[i] == want) {
                    split(uris, u, /[ \t]+/); print u[1] "\t" signed; done = 1; break
                }
            }
            uris = ""; types = ""; suites = ""; signed = ""; enabled = ""
        }
        done { next }
        FNR == 1 { flush() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]*#/) next
            key = tolower($1); sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "signed-by") signed = val
            else if (key == "enabled") enabled = tolower(val)
            next
        }
        /^deb[ \t]/ {
            line = $0; opts = ""
            if (match(line, /\[[^]]*\]/)) {
                opts = substr(line, RSTART + 1, RLENGTH - 2)
                line = substr(line, 1, RSTART - 1) substr(line, RSTART + RLENGTH)
            }
            split(line, f, /[ \t]+/)
            signed = ""
            if (match(opts, /signed-by=[^ \t]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
            if (f[3] == want) { print f[2] "\t" signed; done = 1 }
            signed = ""
        }
        END { flush() }
    ' "${files[@]}"
}

found=$(find_source || true)
if [[ -z $found ]]; then
    echo "fetch-consul: no Debian source for '$codename' in /etc/apt/sources.list{,.d/}" >&2
    exit 1
fi
uri=${found%%$'\t'*}
signed_by=${found#*$'\t'}
# Only a keyring file can be passed on (deb822 also allows an inline key block).
[[ -f $signed_by ]] || signed_by=""

work=$(mktemp -d /tmp/fetch-consul.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt downloads as user _apt
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/dl"
opts="[arch=$(dpkg --print-architecture)${signed_by:+ signed-by=$signed_by}]"
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
echo "fetch-consul: reading $suite from this machine's Debian source" >&2
apt-get -q "${apt_opts[@]}" update >&2
(cd "$work/dl" && apt-get -q "${apt_opts[@]}" download consul >&2)

deb=$(find "$work/dl" -name 'consul_*.deb' | head -n 1)
if [[ -z $deb ]]; then
    echo "fetch-consul: apt-get download consul produced no .deb" >&2
    exit 1
fi
# Unpack next to the target and rename into place, so a half-unpacked tree is never seen.
mkdir -p "$(dirname "$cache")"
staging=$(mktemp -d "$(dirname "$cache")/.consul.XXXXXX")
dpkg -x "$deb" "$staging"
chmod 755 "$staging"
rm -rf "$cache"
mv "$staging" "$cache"
"$binary" version | head -n 1 >&2
