#!/usr/bin/env bash
# Builds the bpfpoly image offline (no registry, no container engine): the release binaries,
# the root filesystem of e2e/env/image-rootfs.sh (what the Containerfile's final stage holds), one
# OCI layer written by e2e/env/oci-image.py, as an OCI archive, and (with --import) imports it into
# the containerd of the local node (e2e/env/node.sh).
#
#   bash e2e/env/build-image.sh [--tag TAG]... [--import]
#       TAG defaults to the chart's appVersion; the image is docker.io/bpfpoly/bpfpoly:TAG
#       (what the chart's default image.repository, bpfpoly/bpfpoly, means), written to
#       .run/images/bpfpoly-TAG.tar. Several --tag: one build, one archive per tag (each tag
#       its own image: the tag is also a label). Prints each archive's size and path.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
log() { echo "[image] $*" >&2; }
die() { echo "[image] ERROR: $*" >&2; exit 1; }

TAGS=() IMPORT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAGS+=("${2:?--tag needs a value}"); shift 2 ;;
        --import) IMPORT=1; shift ;;
        *) die "usage: $0 [--tag TAG]... [--import]" ;;
    esac
done
[[ ${#TAGS[@]} -gt 0 ]] || TAGS=("$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO/charts/bpfpoly/Chart.yaml")")
for TAG in "${TAGS[@]}"; do
    [[ $TAG =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag '$TAG' is not a valid image tag"
done
mkdir -p "$REPO/.run/images"

t0=$SECONDS
log "building the release binaries"
make -s -C "$REPO/ebpf" >&2
(cd "$REPO" && cargo build --release -q -p bpfpoly-operator -p bpfpoly-agent) >&2
ROOTFS="$REPO/.run/images/rootfs"
bash "$HERE/image-rootfs.sh" "$TARGET/release" "$ROOTFS"
args=()
while read -r f; do
    args+=(--file "$ROOTFS$f:$f")
done < <(cd "$ROOTFS" && find . -type f | sed 's|^\.||' | sort)
for TAG in "${TAGS[@]}"; do
    NAME="docker.io/bpfpoly/bpfpoly:$TAG"
    OUT="$REPO/.run/images/bpfpoly-$TAG.tar"
    python3 "$HERE/oci-image.py" --name "$NAME" --out "$OUT" --dir /tmp \
        --entrypoint bpfpoly-operator --user 65532:65532 \
        --label "org.opencontainers.image.title=bpfpoly" \
        --label "org.opencontainers.image.version=$TAG" \
        "${args[@]}" >&2
    log "$NAME: $(du -m "$OUT" | cut -f1) MiB archive ($((SECONDS - t0)) s): $OUT"
    if [[ $IMPORT -eq 1 ]]; then
        bash "$HERE/node.sh" ctr images import "$OUT" >/dev/null
        log "$NAME: imported into the node's containerd (namespace k8s.io)"
    fi
    echo "$OUT"
done
rm -rf "$ROOTFS"
