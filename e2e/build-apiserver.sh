#!/usr/bin/env bash
# Builds kube-apiserver 1.20.2 from Debian's `kubernetes` source package, offline
# (GOPROXY=off, everything from the package's vendor/), and caches the binary at
# ~/.cache/bpfpoly/bin/kube-apiserver. A no-op when that binary is there and runs.
# About 5 minutes on 2 cores; the log goes to ~/.cache/bpfpoly/build-apiserver.log.
#
#   bash e2e/build-apiserver.sh            build if not cached
#   bash e2e/build-apiserver.sh --force    rebuild (keeps the unpacked source)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
BIN="$CACHE/bin/kube-apiserver"
SRC_ROOT="$CACHE/src"
LOG="$CACHE/build-apiserver.log"
REFLECT2_NEW=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC_LIST=/etc/apt/sources.list.d/bpfpoly-deb-src.sources

log() { echo "[bpfpoly] $*" >&2; }
die() { echo "[bpfpoly] ERROR: $*" >&2; exit 1; }

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    *) die "usage: $0 [--force]" ;;
esac

if [[ $FORCE -eq 0 && -x $BIN ]] && "$BIN" --version >/dev/null 2>&1; then
    exit 0
fi

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
    log "apiserver: enabled source packages ($DEB_SRC_LIST); apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes$' \
        || die "source package 'kubernetes' not found even with deb-src entries"
}

if ! TREE="$(src_tree)"; then
    enable_deb_src
    log "apiserver: fetching Debian's kubernetes source package into $SRC_ROOT"
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
    log "apiserver: unpacked $(basename "$TREE") ($((SECONDS - T0)) s)"
fi
VERSION_DIR="$(basename "$TREE")"
case "$VERSION_DIR" in
    kubernetes-1.20.*|*really1.20.*) ;;
    *) log "apiserver: warning: expected kubernetes 1.20.x source, found $VERSION_DIR" ;;
esac

# --- 2. reflect2 1.0.2 instead of the vendored 1.0.1 ---------------------------------
# Go >= 1.18 crashes reflect2 v1.0.1 (used by json-iterator) at the first
# custom-resource request; 1.0.2 has the fix. Its go.mod is dropped: vendor/ holds
# plain packages and vendor/modules.txt still names the module.
R2="$TREE/vendor/github.com/modern-go/reflect2"
if ! cmp -s "$REFLECT2_NEW/go_above_118.go" "$R2/go_above_118.go" 2>/dev/null; then
    log "apiserver: replacing vendored reflect2 with 1.0.2 from $REFLECT2_NEW"
    rm -rf "$R2"
    mkdir -p "$R2"
    cp -L "$REFLECT2_NEW"/* "$R2"/
    rm -f "$R2/go.mod" "$R2/go.sum"
fi

# --- 3. GOPATH layout the 1.20 build scripts expect ----------------------------------
mkdir -p "$TREE/.go/src/k8s.io"
[[ -L $TREE/.go/src/k8s.io/kubernetes ]] || ln -sfn ../../.. "$TREE/.go/src/k8s.io/kubernetes"

# --- 4. Build ------------------------------------------------------------------------
log "apiserver: building kube-apiserver with $(go version | awk '{print $3}') (about 5 min on 2 cores; log: $LOG)"
: >"$LOG"
(
    cd "$TREE"
    export GOPATH="$TREE/.go" CGO_ENABLED=0 GOPROXY=off
    exec make WHAT=cmd/kube-apiserver
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
        log "apiserver:   ... $((SECONDS - T0)) s${last:+ ($last)}"
    fi
done
if ! wait "$BUILD_PID"; then
    echo "----- last 40 lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2
    die "kube-apiserver build failed (full log: $LOG)"
fi
trap - INT TERM

OUT="$TREE/_output/local/bin/linux/amd64/kube-apiserver"
[[ -x $OUT ]] || OUT="$TREE/_output/bin/kube-apiserver"
[[ -x $OUT ]] || die "build finished but no kube-apiserver under $TREE/_output (log: $LOG)"
install -m 0755 "$OUT" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
"$BIN" --version >/dev/null 2>&1 || die "$BIN does not run (--version failed)"
log "apiserver: $("$BIN" --version) cached at $BIN ($((SECONDS - T0)) s)"
