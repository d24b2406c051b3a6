#!/usr/bin/env bash
# Fetches the real BTF of Debian 12's 6.1 cloud kernel, for tests that need the
# types of a kernel other than the one running: downloads the newest
# linux-image-6.1.0-N-cloud-amd64-unsigned package, pulls the ELF vmlinux out of
# /boot/vmlinuz-* and keeps its .BTF section.
#
# Result (idempotent; nothing is fetched when it is already there):
#   ~/.cache/bpfpoly/btf/<release>.btf             raw BTF, e.g. 6.1.0-37-cloud-amd64.btf
#   ~/.cache/bpfpoly/btf/debian-6.1-cloud.btf      stable symlink to it
#   ~/.cache/bpfpoly/btf/debian-6.1-cloud.release  the release string
#
#   bash e2e/env/fetch-btf.sh             fetch if missing
#   bash e2e/env/fetch-btf.sh --refresh   fetch again (picks up a newer package)
#   bash e2e/env/fetch-btf.sh --from-vmlinuz VMLINUZ OUT.btf
#                                     only the extraction, for a vmlinuz already on disk
#                                     (e2e/kernels/fetch.sh uses it for every kernel it fetches)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
BTF_DIR="$CACHE/btf"
LINK="$BTF_DIR/debian-6.1-cloud.btf"
RELEASE_FILE="$BTF_DIR/debian-6.1-cloud.release"
MIN_TYPES=50000 # the 6.1 cloud kernel has about 95k; anything far below is not a kernel's BTF

log() { echo "[bpfpoly] $*" >&2; }
die() { echo "[bpfpoly] ERROR: $*" >&2; exit 1; }

# Valid BTF starts with the magic 0xeB9F (little-endian on x86).
is_btf() { [[ -s $1 && $(od -An -tx1 -N2 "$1" | tr -d ' \n') == 9feb ]]; }

# extract_btf VMLINUZ WORK: the raw .BTF of the kernel in an x86 bzImage, as WORK/vmlinux.btf.
extract_btf() {
    local VMLINUZ=$1 WORK=$2 SETUP_SECTS PAYLOAD_OFFSET PAYLOAD_LENGTH START MAGIC OBJCOPY
    # x86 boot protocol setup header: the protected-mode kernel starts after
    # (setup_sects + 1) 512-byte sectors; payload_offset/payload_length locate the
    # compressed vmlinux inside it.
    u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
    u32() { od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' '; }
    [[ $(od -An -c -j $((0x202)) -N4 "$VMLINUZ" | tr -d ' ') == HdrS ]] \
        || die "$VMLINUZ is not an x86 bzImage (no HdrS setup header)"
    SETUP_SECTS="$(u8 "$VMLINUZ" $((0x1f1)))"
    [[ $SETUP_SECTS -eq 0 ]] && SETUP_SECTS=4 # boot protocol: 0 means 4
    PAYLOAD_OFFSET="$(u32 "$VMLINUZ" $((0x248)))"
    PAYLOAD_LENGTH="$(u32 "$VMLINUZ" $((0x24c)))"
    START=$(((SETUP_SECTS + 1) * 512 + PAYLOAD_OFFSET))
    dd if="$VMLINUZ" of="$WORK/payload" bs=1M iflag=skip_bytes,count_bytes \
        skip="$START" count="$PAYLOAD_LENGTH" status=none
    [[ $(stat -c %s "$WORK/payload") -eq $PAYLOAD_LENGTH && $PAYLOAD_LENGTH -gt 0 ]] \
        || die "payload of $VMLINUZ (offset $START, length $PAYLOAD_LENGTH) lies outside the file"

    MAGIC="$(od -An -tx1 -N6 "$WORK/payload" | tr -d ' \n')"
    case "$MAGIC" in
        02214c18*) log "btf: payload is LZ4 (legacy), $PAYLOAD_LENGTH bytes at offset $START; decompressing"
                   lz4 -d -c "$WORK/payload" >"$WORK/vmlinux" 2>"$WORK/lz4.log" || true ;;
        1f8b*)     gzip -d -c "$WORK/payload" >"$WORK/vmlinux" 2>/dev/null || true ;;
        fd377a585a00) xz -d -c "$WORK/payload" >"$WORK/vmlinux" 2>/dev/null || true ;;
        # zstd (6.12 and newer): the kernel build appends the uncompressed size as 4 bytes,
        # which zstd reads as a truncated frame; cut them off first.
        28b52ffd*) log "btf: payload is zstd, $PAYLOAD_LENGTH bytes at offset $START; decompressing"
                   head -c $((PAYLOAD_LENGTH - 4)) "$WORK/payload" | zstd -d -q -c >"$WORK/vmlinux" 2>"$WORK/lz4.log" || true ;;
        *) die "unknown compression of the vmlinux payload in $VMLINUZ (magic $MAGIC)" ;;
    esac
    # The payload may carry trailing bytes (the decompressed size); decompressors
    # then complain at the end although the ELF is complete, so judge the result.
    [[ $(od -An -c -N4 "$WORK/vmlinux" | tr -d ' ') == 177ELF ]] \
        || { cat "$WORK/lz4.log" >&2 2>/dev/null || true; die "decompressed payload of $VMLINUZ is not an ELF vmlinux"; }

    OBJCOPY="$(command -v objcopy || command -v llvm-objcopy || true)"
    [[ -n $OBJCOPY ]] || die "neither objcopy nor llvm-objcopy found"
    "$OBJCOPY" -O binary --only-section=.BTF "$WORK/vmlinux" "$WORK/vmlinux.btf" \
        || die "$OBJCOPY could not extract .BTF from vmlinux"
    is_btf "$WORK/vmlinux.btf" || die "the .BTF section of $VMLINUZ's vmlinux is missing or not BTF"
    rm -f "$WORK/vmlinux" "$WORK/payload"
}

REFRESH=0
case "${1:-}" in
    "") ;;
    --refresh) REFRESH=1 ;;
    --from-vmlinuz)
        [[ $# -eq 3 && -f $2 ]] || die "usage: $0 --from-vmlinuz VMLINUZ OUT.btf"
        bash "$HERE/install-deps.sh" --apt lz4 zstd xz-utils binutils
        FROM_WORK="$(mktemp -d)"
        trap 'rm -rf "$FROM_WORK"' EXIT
        extract_btf "$2" "$FROM_WORK"
        mv -f "$FROM_WORK/vmlinux.btf" "$3"
        exit 0 ;;
    *) die "usage: $0 [--refresh | --from-vmlinuz VMLINUZ OUT.btf]" ;;
esac

if [[ $REFRESH -eq 0 && -L $LINK && -s $RELEASE_FILE ]] && is_btf "$LINK"; then
    exit 0
fi

bash "$HERE/install-deps.sh" --apt lz4 bpftool binutils

# The newest 6.1 cloud image package the apt sources offer (Debian 12 ships the
# 6.1 kernel as linux-image-6.1.0-<abi>-cloud-amd64-unsigned).
find_package() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' 2>/dev/null \
        | awk '{print $1}' | sort -V | tail -n 1
}
PKG="$(find_package)"
if [[ -z $PKG ]]; then
    [[ $(id -u) -eq 0 ]] || die "no linux-image-6.1.0-*-cloud-amd64-unsigned in the apt lists (apt-get update needs root)"
    log "btf: apt lists lack the 6.1 cloud kernel; apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    PKG="$(find_package)"
    [[ -n $PKG ]] || die "no linux-image-6.1.0-*-cloud-amd64-unsigned package in the apt sources"
fi
RELEASE="${PKG#linux-image-}"
RELEASE="${RELEASE%-unsigned}"
OUT="$BTF_DIR/$RELEASE.btf"

mkdir -p "$BTF_DIR"
if [[ $REFRESH -eq 1 || ! -s $OUT ]] || ! is_btf "$OUT"; then
    T0=$SECONDS
    WORK="$(mktemp -d "$CACHE/btf-work.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    log "btf: downloading $PKG"
    # apt drops privileges to _apt for downloads; let it write into the work dir.
    if id _apt >/dev/null 2>&1; then chown _apt "$WORK" 2>/dev/null || true; fi
    (cd "$WORK" && apt-get download -q "$PKG") >"$WORK/apt.log" 2>&1 || {
        tail -n 20 "$WORK/apt.log" >&2
        die "apt-get download $PKG failed"
    }
    debs=("$WORK"/*.deb)
    DEB="${debs[0]}"
    [[ -f $DEB ]] || die "apt-get download $PKG produced no .deb"
    log "btf: extracting /boot/vmlinuz-$RELEASE from $(basename "$DEB") ($(du -m "$DEB" | cut -f1) MiB)"
    dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK" --wildcards './boot/vmlinuz-*' \
        || die "no /boot/vmlinuz-* in $DEB"
    images=("$WORK"/boot/vmlinuz-*)
    VMLINUZ="${images[0]}"
    [[ $(basename "$VMLINUZ") == "vmlinuz-$RELEASE" ]] \
        || log "btf: warning: package $PKG holds $(basename "$VMLINUZ"), expected vmlinuz-$RELEASE"

    extract_btf "$VMLINUZ" "$WORK"
    chmod 0644 "$WORK/vmlinux.btf"
    mv -f "$WORK/vmlinux.btf" "$OUT.tmp"
    mv -f "$OUT.tmp" "$OUT"
    log "btf: wrote $OUT ($((SECONDS - T0)) s)"
fi

# Does it parse, and is it a whole kernel's BTF?
TYPES="$(bpftool btf dump file "$OUT" 2>/dev/null | grep -c '^\[[0-9]*\] ' || true)"
[[ $TYPES -ge $MIN_TYPES ]] || die "bpftool parses only $TYPES types from $OUT (expected about 95k)"

ln -sfn "$(basename "$OUT")" "$LINK.tmp"
mv -Tf "$LINK.tmp" "$LINK"
echo "$RELEASE" >"$RELEASE_FILE.tmp"
mv -f "$RELEASE_FILE.tmp" "$RELEASE_FILE"
log "btf: $LINK -> $(basename "$OUT") ($RELEASE, $TYPES types)"
