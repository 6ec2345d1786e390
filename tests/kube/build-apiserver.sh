#!/usr/bin/env bash
# Build kube-apiserver v1.20.2 once from Debian's `kubernetes` source package
# (notes/backends.md section 5) into a cache outside the repo, and print its path.
# Idempotent: a cached binary that reports the right version is reused.
set -euo pipefail

version="v1.20.2"
cache="${MSPC_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mspc-broker/kube}"
bin="$cache/bin/kube-apiserver"

have_binary() {
    [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -qx "Kubernetes $version"
}

# apt-get install the packages whose commands are missing: need_packages CMD:PKG...
need_packages() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        echo "build-apiserver: apt-get install ${missing[*]}" >&2
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; then
            apt-get update -q >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
        fi
    fi
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# etcd is needed at run time even when the binary is cached.
need_packages etcd:etcd-server

if have_binary; then
    echo "$bin"
    exit 0
fi

need_packages go:golang-go rsync:rsync jq:jq

started=$(date +%s)
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# A throwaway apt state that only knows the deb-src line, so the system's apt
# configuration is left untouched.
uri="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)"
uri="${uri:-http://deb.debian.org/debian}"
mkdir -p "$work/apt/lists/partial"
echo "deb-src $uri bookworm main" >"$work/apt/src.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/apt/src.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/apt/lists"
)
(
    cd "$work"
    apt-get "${apt_opts[@]}" update -q >&2
    apt-get "${apt_opts[@]}" source --download-only kubernetes >&2
    tar xzf kubernetes_*.orig.tar.gz
)
src="$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
mkdir -p "$work/home"
(
    cd "$src"
    HOME="$work/home" GOPROXY=off GOFLAGS= CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2
)
mkdir -p "$cache/bin"
install -m 0755 "$src/_output/bin/kube-apiserver" "$bin.tmp"
mv -f "$bin.tmp" "$bin"
have_binary
echo "build-apiserver: built $("$bin" --version) in $(($(date +%s) - started))s" >&2
echo "$bin"
