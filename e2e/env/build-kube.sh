#!/usr/bin/env bash
# Builds Kubernetes 1.20.2 server binaries from Debian's `kubernetes` source package,
# offline (GOPROXY=off, everything from the package's vendor/), and caches each one at
# ~/.cache/bpfpoly/bin/<name>. Components already cached (and running) are skipped; the
# missing ones are built in one `make WHAT=...` (they share most packages). Progress every
# 30 s; the log goes to ~/.cache/bpfpoly/build-kube.log.
# Cold on 2 cores: kube-apiserver about 5.5 min; kubelet, kube-proxy, kube-controller-manager
# and kube-scheduler together about 3 min more (they reuse its compiled packages).
#
#   bash e2e/env/build-kube.sh [--force] COMPONENT...
#   COMPONENT: kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler
#   (e2e/env/build-apiserver.sh = build-kube.sh kube-apiserver; e2e/env/node.sh builds the rest)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
SRC_ROOT="$CACHE/src"
LOG="$CACHE/build-kube.log"
REFLECT2_NEW=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC_LIST=/etc/apt/sources.list.d/bpfpoly-deb-src.sources

log() { echo "[bpfpoly] $*" >&2; }
die() { echo "[bpfpoly] ERROR: $*" >&2; exit 1; }

FORCE=0
COMPONENTS=()
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        kube-apiserver|kubelet|kube-proxy|kube-controller-manager|kube-scheduler) COMPONENTS+=("$a") ;;
        *) die "usage: $0 [--force] COMPONENT... (kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler); got '$a'" ;;
    esac
done
[[ ${#COMPONENTS[@]} -gt 0 ]] || die "usage: $0 [--force] COMPONENT..."

# A component is cached when its binary is there and answers --version.
cached() { [[ -x $CACHE/bin/$1 ]] && "$CACHE/bin/$1" --version >/dev/null 2>&1; }
TODO=()
for c in "${COMPONENTS[@]}"; do
    if [[ $FORCE -eq 1 ]] || ! cached "$c"; then TODO+=("$c"); fi
done
[[ ${#TODO[@]} -gt 0 ]] || exit 0
WHAT="${TODO[*]/#/cmd/}"
TAG="${TODO[*]}"
[[ ${#TODO[@]} -eq 1 ]] || TAG="kube"

bash "$HERE/install-deps.sh" --apt golang-go rsync make dpkg-dev xz-utils golang-github-modern-go-reflect2-dev
[[ -d $REFLECT2_NEW ]] || die "$REFLECT2_NEW missing (package golang-github-modern-go-reflect2-dev)"

mkdir -p "$CACHE/bin" "$SRC_ROOT"
T0=$SECONDS

# --- 1. Debian's source tree ----------------------------------------------------
src_tree() {
    local d
    for d in "$SRC_ROOT"/kubernetes-*/; do
        [[ -f $d/Makefile && -d $d/vendor && -f $d/.bpfpoly-unpacked ]] && { echo "${d%/}"; return 0; }
    done
    return 1
}

# Source packages need deb-src entries: a copy of the system's deb sources with
# `Types: deb-src` (deb822 format, Debian 12's default) or `deb-src` lines (old format).
enable_deb_src() {
    if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes$'; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "enabling deb-src entries needs root"
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        sed -e 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$DEB_SRC_LIST"
    elif grep -qs '^deb ' /etc/apt/sources.list; then
        DEB_SRC_LIST=/etc/apt/sources.list.d/bpfpoly-deb-src.list
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$DEB_SRC_LIST"
    else
        die "no Debian apt sources found to derive deb-src entries from"
    fi
    log "$TAG: enabled source packages ($DEB_SRC_LIST); apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes$' \
        || die "source package 'kubernetes' not found even with deb-src entries"
}

if ! TREE="$(src_tree)"; then
    enable_deb_src
    log "$TAG: fetching Debian's kubernetes source package into $SRC_ROOT"
    # A half-unpacked tree from an interrupted run is thrown away.
    rm -rf "$SRC_ROOT"/kubernetes-*/ "$SRC_ROOT"/kubernetes_*
    # apt drops privileges to _apt for downloads; let it write here to avoid a warning.
    if id _apt >/dev/null 2>&1; then chown _apt "$SRC_ROOT" 2>/dev/null || true; fi
    (cd "$SRC_ROOT" && apt-get source -q kubernetes) >"$LOG" 2>&1 || {
        tail -n 20 "$LOG" >&2
        die "apt-get source kubernetes failed (log: $LOG)"
    }
    for d in "$SRC_ROOT"/kubernetes-*/; do
        [[ -f $d/Makefile && -d $d/vendor ]] && touch "$d/.bpfpoly-unpacked"
    done
    TREE="$(src_tree)" || die "no kubernetes-*/ tree with Makefile and vendor/ under $SRC_ROOT"
    log "$TAG: unpacked $(basename "$TREE") ($((SECONDS - T0)) s)"
fi
VERSION_DIR="$(basename "$TREE")"
case "$VERSION_DIR" in
    kubernetes-1.20.*|*really1.20.*) ;;
    *) log "$TAG: warning: expected kubernetes 1.20.x source, found $VERSION_DIR" ;;
esac

# --- 2. reflect2 1.0.2 instead of the vendored 1.0.1 ---------------------------------
# Go >= 1.18 crashes reflect2 v1.0.1 (used by json-iterator) at the first
# custom-resource request; 1.0.2 has the fix. Its go.mod is dropped: vendor/ holds
# plain packages and vendor/modules.txt still names the module.
R2="$TREE/vendor/github.com/modern-go/reflect2"
if ! cmp -s "$REFLECT2_NEW/go_above_118.go" "$R2/go_above_118.go" 2>/dev/null; then
    log "$TAG: replacing vendored reflect2 with 1.0.2 from $REFLECT2_NEW"
    rm -rf "$R2"
    mkdir -p "$R2"
    cp -L "$REFLECT2_NEW"/* "$R2"/
    rm -f "$R2/go.mod" "$R2/go.sum"
fi

# --- 2b. The kubelet links no cloud credential provider or cloud probe -----------------
# 1.20 links the AWS, Azure and GCP image-credential providers into every kubelet (even
# providerless); the AWS one asks the cloud metadata address for credentials at start.
# cAdvisor's cloud probes (gated on DMI files) go too. This machine pulls no image from any
# registry and runs on no cloud API.
PATCHED=(cmd/kubelet/app/plugins.go pkg/kubelet/cadvisor/cadvisor_linux.go)
CLOUD_IMPORTS='_ "\(k8s.io/kubernetes/pkg/credentialprovider\|github.com/google/cadvisor/utils/cloudinfo\)/\(aws\|azure\|gcp\|gce\)"'
for f in "${PATCHED[@]}"; do
    if grep -q "$CLOUD_IMPORTS" "$TREE/$f"; then
        log "$TAG: dropping the cloud credential providers and probes from $f"
        sed -i "\#$CLOUD_IMPORTS#d" "$TREE/$f"
    fi
done

# --- 3. GOPATH layout the 1.20 build scripts expect ----------------------------------
mkdir -p "$TREE/.go/src/k8s.io"
[[ -L $TREE/.go/src/k8s.io/kubernetes ]] || ln -sfn ../../.. "$TREE/.go/src/k8s.io/kubernetes"

# --- 4. Build ------------------------------------------------------------------------
log "$TAG: building ${TODO[*]} with $(go version | awk '{print $3}') (cold on 2 cores: kube-apiserver ~5.5 min, the node components ~3 min more; log: $LOG)"
: >"$LOG"
(
    cd "$TREE"
    export GOPATH="$TREE/.go" CGO_ENABLED=0 GOPROXY=off
    # providerless: no cloud providers and no cloud credential providers, so nothing asks
    # a cloud metadata address for credentials (the kubelet's AWS provider does at start).
    exec make WHAT="$WHAT" GOFLAGS=-tags=providerless
) >>"$LOG" 2>&1 &
BUILD_PID=$!
trap 'kill "$BUILD_PID" 2>/dev/null || true' INT TERM
# Progress: a line every 30 s with the elapsed time and the build's latest output.
while kill -0 "$BUILD_PID" 2>/dev/null; do
    for _ in $(seq 30); do
        kill -0 "$BUILD_PID" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$BUILD_PID" 2>/dev/null; then
        last="$(tail -n 1 "$LOG" 2>/dev/null | cut -c1-100)"
        log "$TAG:   ... $((SECONDS - T0)) s${last:+ ($last)}"
    fi
done
if ! wait "$BUILD_PID"; then
    echo "----- last 40 lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2
    die "build of ${TODO[*]} failed (full log: $LOG)"
fi
trap - INT TERM

for c in "${TODO[@]}"; do
    OUT="$TREE/_output/local/bin/linux/amd64/$c"
    [[ -x $OUT ]] || OUT="$TREE/_output/bin/$c"
    [[ -x $OUT ]] || die "build finished but no $c under $TREE/_output (log: $LOG)"
    BIN="$CACHE/bin/$c"
    install -m 0755 "$OUT" "$BIN.tmp"
    mv -f "$BIN.tmp" "$BIN"
    "$BIN" --version >/dev/null 2>&1 || die "$BIN does not run (--version failed)"
    log "$c: $("$BIN" --version) cached at $BIN ($((SECONDS - T0)) s)"
done
