#!/usr/bin/env bash
# The bpfpoly image's root filesystem: bpfpoly-operator and bpfpoly-agent (stripped) in
# /usr/local/bin, the shared libraries they link (as ldd names them: glibc, libm, libgcc_s,
# the dynamic loader) at the same paths, and an empty /tmp. Nothing else: no shell, no
# package manager. Used by the Containerfile's build stage and by e2e/env/build-image.sh, so the
# image a user builds with `docker build .` and the one built offline here are the same files.
#
#   bash e2e/env/image-rootfs.sh BIN_DIR OUT_DIR     BIN_DIR holds the two release binaries
set -euo pipefail
die() { echo "[image] ERROR: $*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 BIN_DIR OUT_DIR"
BIN_DIR=$1 OUT=$2
rm -rf "$OUT"
mkdir -p "$OUT/usr/local/bin" "$OUT/tmp"
chmod 1777 "$OUT/tmp"
for b in bpfpoly-operator bpfpoly-agent; do
    [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing (cargo build --release -p $b)"
    strip --strip-all -o "$OUT/usr/local/bin/$b" "$BIN_DIR/$b"
    ldd "$BIN_DIR/$b" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'
done | sort -u | while read -r lib; do
    real="$(readlink -f "$lib")"
    mkdir -p "$OUT$(dirname "$lib")"
    cp "$real" "$OUT$lib"
done
# The loader's path is fixed in the binaries (/lib64/ld-linux-x86-64.so.2); Debian keeps it
# in /lib/x86_64-linux-gnu with /lib64 a link.
[[ -e $OUT/lib64/ld-linux-x86-64.so.2 ]] || die "no dynamic loader copied into $OUT/lib64"
