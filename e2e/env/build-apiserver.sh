#!/usr/bin/env bash
# Builds kube-apiserver 1.20.2 from Debian's `kubernetes` source package, offline, and
# caches it at ~/.cache/bpfpoly/bin/kube-apiserver (about 5 min cold on 2 cores). A no-op
# when that binary is there and runs. See build-kube.sh, which builds every component.
#
#   bash e2e/env/build-apiserver.sh            build if not cached
#   bash e2e/env/build-apiserver.sh --force    rebuild (keeps the unpacked source)
set -euo pipefail
case "${1:-}" in
    ""|--force) ;;
    *) echo "[bpfpoly] ERROR: usage: $0 [--force]" >&2; exit 1 ;;
esac
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/build-kube.sh" "$@" kube-apiserver
