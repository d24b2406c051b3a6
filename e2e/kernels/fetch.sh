#!/usr/bin/env bash
# Fetches the Debian kernels named in e2e/kernels/kernels.list into the cache, with progress:
# for each, the vmlinuz, its raw BTF (through e2e/env/fetch-btf.sh's extraction), and the
# kernel modules the microVM needs, resolved through modules.dep and decompressed for
# busybox's insmod, with the order to load them in.
#
# Packages come from the same Debian mirror as the host's apt sources, through a PRIVATE apt
# configuration (own sources list, lists, cache; the host's apt state is not touched) and
# are only unpacked, never installed.
#
#   bash e2e/kernels/fetch.sh [NAME...]          fetch what is missing (default: every kernel)
#   bash e2e/kernels/fetch.sh --refresh [NAME...] look for newer packages and fetch again
#
# Result, per kernel (idempotent; a kernel already complete is not fetched again):
#   ~/.cache/bpfpoly/kernels/<NAME>/vmlinuz      the kernel (bzImage)
#   ~/.cache/bpfpoly/kernels/<NAME>/release      its release string (uname -r)
#   ~/.cache/bpfpoly/kernels/<NAME>/config       its configuration (the guests' /boot/config-<release>)
#   ~/.cache/bpfpoly/kernels/<NAME>/package      the package(s) it came from
#   ~/.cache/bpfpoly/kernels/<NAME>/vmlinux.btf  its raw BTF
#   ~/.cache/bpfpoly/kernels/<NAME>/modules/     *.ko (decompressed) and load.order
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E="$(cd "$HERE/.." && pwd)"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
KCACHE="$CACHE/kernels"
LIST="$HERE/kernels.list"
APT_DIR="$KCACHE/apt"
# The modules the guest loads (with their dependencies): the virtio network chain for the
# guestfwd path to the API server, virtio-rng so TLS does not wait for entropy, veth for
# the samples' interfaces, clsact (sch_ingress) and cls_bpf for the tc variants.
WANTED_MODULES=(virtio_pci virtio_net virtio_rng veth sch_ingress cls_bpf)

log() { echo "[bpfpoly] kernels: $*" >&2; }
die() { echo "[bpfpoly] ERROR: kernels: $*" >&2; exit 1; }

REFRESH=0
if [[ ${1:-} == --refresh ]]; then REFRESH=1; shift; fi

# NAME SUITE IMAGE-REGEX [MODULES-REGEX] for the kernels asked for (all by default).
kernel_lines() {
    local want=" $* " name rest
    while read -r name rest; do
        [[ -z $name || $name == \#* ]] && continue
        if [[ $# -eq 0 || $want == *" $name "* ]]; then echo "$name $rest"; fi
    done <"$LIST"
}

mapfile -t LINES < <(kernel_lines "$@")
for k in "$@"; do
    printf '%s\n' "${LINES[@]}" | awk -v k="$k" '$1 == k {f=1} END {exit !f}' \
        || die "kernel '$k' is not in $LIST (known: $(kernel_lines | awk '{print $1}' | tr '\n' ' '))"
done
[[ ${#LINES[@]} -gt 0 ]] || die "no kernels in $LIST"

complete() { # NAME: everything there
    local d="$KCACHE/$1"
    [[ -s $d/vmlinuz && -s $d/release && -s $d/vmlinux.btf && -s $d/modules/load.order && -s $d/config ]]
}

todo=()
for line in "${LINES[@]}"; do
    read -r name _ <<<"$line"
    if [[ $REFRESH -eq 1 ]] || ! complete "$name"; then todo+=("$line"); fi
done
if [[ ${#todo[@]} -eq 0 ]]; then
    exit 0
fi

bash "$E2E/env/install-deps.sh" --apt lz4 zstd xz-utils binutils bpftool dpkg-dev kmod

# --- the private apt configuration --------------------------------------------------------

# The host's Debian mirror (the URIs of its `Types: deb` entry for the main archive).
mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri="$(awk 'BEGIN{RS=""} /Types:[^\n]*deb( |\n|$)/ && /Components:[^\n]*main/ {
                 if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u);
                   if (u !~ /security/) { print u; exit } } }' "$f")"
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list 2>/dev/null || true)"
    [[ -n $uri ]] && echo "$uri"
}

APT_OPTS=()
setup_apt() {
    local uri suites
    uri="$(mirror)"
    [[ -n $uri ]] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/etc"
    suites="$(kernel_lines | awk '{print $2}' | sort -u)"
    : >"$APT_DIR/etc/sources.list.new"
    local s
    for s in $suites; do
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $s main" >>"$APT_DIR/etc/sources.list.new"
    done
    mv -f "$APT_DIR/etc/sources.list.new" "$APT_DIR/etc/sources.list"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::Etc::Preferences=/dev/null" -o Dir::Etc::PreferencesParts=/dev/null
              -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
              -o APT::Architecture=amd64 -o Acquire::Languages=none)
    if id _apt >/dev/null 2>&1; then chown -R _apt "$APT_DIR/lists" "$APT_DIR/cache" 2>/dev/null || true; fi
    # The lists are refreshed when asked, when a suite is missing, or when older than a day
    # (a kernel package named in yesterday's index may have been superseded on the mirror).
    local fresh=1 lf
    for s in $suites; do
        lf="$(find "$APT_DIR/lists" -maxdepth 1 -name "*_dists_${s}_main_binary-amd64_Packages*" -mmin -1440 2>/dev/null | head -n1)"
        [[ -n $lf ]] || fresh=0
    done
    if [[ $REFRESH -eq 1 || $fresh -eq 0 ]]; then
        log "apt-get update (private configuration under $APT_DIR; suites: $(echo $suites))"
        local t0=$SECONDS
        apt-get "${APT_OPTS[@]}" update -q >"$APT_DIR/update.log" 2>&1 \
            || { tail -n 20 "$APT_DIR/update.log" >&2; die "apt-get update (private) failed"; }
        log "apt lists updated in $((SECONDS - t0)) s"
    fi
}

newest() { # REGEX: the newest package name matching it
    apt-cache "${APT_OPTS[@]}" pkgnames 2>/dev/null | grep -E "$1" | sort -V | tail -n 1
}

download() { # PKG DIR
    local pkg=$1 dir=$2 size
    size="$(apt-cache "${APT_OPTS[@]}" show "$pkg" 2>/dev/null | awk '/^Size:/ {print int($2 / 1048576); exit}')"
    log "  downloading $pkg (${size:-?} MiB)"
    if id _apt >/dev/null 2>&1; then chown _apt "$dir" 2>/dev/null || true; fi
    (cd "$dir" && apt-get "${APT_OPTS[@]}" download -q "$pkg") >"$dir/apt.log" 2>&1 \
        || { tail -n 20 "$dir/apt.log" >&2; die "apt-get download $pkg failed"; }
}

# --- modules ---------------------------------------------------------------------------

# resolve_modules MODDIR OUT: copies the wanted modules and their dependencies (from
# modules.dep), decompressed, into OUT and writes OUT/load.order (dependencies first).
resolve_modules() {
    local moddir=$1 out=$2 m
    # The packages ship no modules.dep (their postinst runs depmod): make it here.
    local base=${moddir%/lib/modules/*} release=${moddir##*/}
    [[ -s $moddir/modules.dep ]] || depmod -b "$base" "$release" 2>"$out.depmod.log" \
        || { cat "$out.depmod.log" >&2; die "depmod -b $base $release failed"; }
    [[ -s $moddir/modules.dep ]] || die "no modules.dep in $moddir after depmod"
    mkdir -p "$out"
    python3 - "$moddir" "$out" "${WANTED_MODULES[@]}" <<'EOF'
import os, subprocess, sys
moddir, out, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps = {}
for line in open(os.path.join(moddir, "modules.dep")):
    path, _, rest = line.strip().partition(":")
    deps[path] = rest.split()
builtin = set()
bfile = os.path.join(moddir, "modules.builtin")
if os.path.exists(bfile):
    builtin = {os.path.basename(l.strip()).split(".ko")[0].replace("-", "_") for l in open(bfile)}
by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
order, seen = [], set()
def visit(path):
    if path in seen:
        return
    seen.add(path)
    # modules.dep lists every (transitive) dependency; modprobe loads them last to first.
    for d in reversed(deps.get(path, [])):
        visit(d)
    order.append(path)
for name in wanted:
    if name in builtin:
        print(f"[bpfpoly] kernels:   {name}: built in", file=sys.stderr)
        continue
    if name not in by_name and not os.path.exists(bfile):
        # 7.2's packages ship no modules.builtin: a module missing from the package is
        # built in (the guest fails loudly at boot when a device it needs is missing).
        print(f"[bpfpoly] kernels:   {name}: not a module in the package (no modules.builtin shipped): built in", file=sys.stderr)
        continue
    if name not in by_name:
        sys.exit(f"[bpfpoly] ERROR: kernels: module {name} is neither in modules.dep nor built in ({moddir})")
    visit(by_name[name])
names = []
for path in order:
    src = os.path.join(moddir, path)
    base = os.path.basename(path)
    name = base.split(".ko")[0] + ".ko"
    dst = os.path.join(out, name)
    with open(dst, "wb") as f:
        if base.endswith(".ko.xz"):
            subprocess.run(["xz", "-d", "-c", src], stdout=f, check=True)
        elif base.endswith(".ko.zst"):
            subprocess.run(["zstd", "-d", "-q", "-c", src], stdout=f, check=True)
        elif base.endswith(".ko.gz"):
            subprocess.run(["gzip", "-d", "-c", src], stdout=f, check=True)
        else:
            f.write(open(src, "rb").read())
    names.append(name)
open(os.path.join(out, "load.order"), "w").write("".join(n + "\n" for n in names))
print(f"[bpfpoly] kernels:   modules: {' '.join(n[:-3] for n in names)}", file=sys.stderr)
EOF
}

# --- one kernel ----------------------------------------------------------------------------

fetch_kernel() { # NAME SUITE IMAGE-REGEX [MODULES-REGEX [CONFIG-REGEX]]
    local name=$1 suite=$2 image_re=$3 modules_re=${4:-} config_re=${5:-} dir="$KCACHE/$1" t0=$SECONDS
    local image_pkg modules_pkg config_pkg work vmlinuz moddir release
    image_pkg="$(newest "$image_re")"
    [[ -n $image_pkg ]] || die "$name: no package matching $image_re in $suite"
    modules_pkg=""
    if [[ -n $modules_re ]]; then
        modules_pkg="$(newest "$modules_re")"
        [[ -n $modules_pkg ]] || die "$name: no package matching $modules_re in $suite"
    fi
    config_pkg=""
    if [[ -n $config_re ]]; then
        config_pkg="$(newest "$config_re")"
        [[ -n $config_pkg ]] || die "$name: no package matching $config_re in $suite"
    fi
    log "$name ($suite): $image_pkg${modules_pkg:+ + $modules_pkg}${config_pkg:+ + $config_pkg}"
    mkdir -p "$KCACHE"
    work="$(mktemp -d "$KCACHE/.work-$name.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: the trap must remove this kernel's work dir
    trap "rm -rf '$work'" EXIT
    download "$image_pkg" "$work"
    [[ -z $modules_pkg ]] || download "$modules_pkg" "$work"
    [[ -z $config_pkg ]] || download "$config_pkg" "$work"
    mkdir -p "$work/root"
    local deb
    for deb in "$work"/*.deb; do
        log "  unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$work/root"
    done
    vmlinuz="$(find "$work/root/boot" "$work/root/usr/lib/modules" -maxdepth 2 -name 'vmlinuz*' -type f 2>/dev/null | head -n1 || true)"
    [[ -n $vmlinuz ]] || die "$name: no vmlinuz in $image_pkg"
    moddir="$(find "$work/root/lib/modules" "$work/root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1 || true)"
    [[ -n $moddir ]] || die "$name: no lib/modules/<release> in the packages"
    release="$(basename "$moddir")"
    # depmod -b reads BASE/lib/modules; newer packages (7.2) ship usr/lib/modules.
    if [[ $moddir == "$work/root/usr/lib/modules/"* && ! -e $work/root/lib/modules ]]; then
        mkdir -p "$work/root/lib" && ln -s ../usr/lib/modules "$work/root/lib/modules"
        moddir="$work/root/lib/modules/$release"
    fi

    mkdir -p "$work/out"
    cp "$vmlinuz" "$work/out/vmlinuz"
    # The kernel's configuration (boot/config-<release>, or beside the modules in newer
    # packages): the guests get it as /boot/config-<release>, where libbpf and the agent
    # read CONFIG_* values for __kconfig externs.
    local config
    config="$(find "$work/root/boot" "$moddir" -maxdepth 1 \( -name "config-$release" -o -name config \) -type f 2>/dev/null | head -n1 || true)"
    [[ -n $config ]] || die "$name: no kernel configuration (boot/config-$release) in $image_pkg"
    grep -q '^CONFIG_BPF=y' "$config" || die "$name: $config does not read as a kernel configuration (no CONFIG_BPF=y)"
    cp "$config" "$work/out/config"
    log "  extracting BTF"
    bash "$E2E/env/fetch-btf.sh" --from-vmlinuz "$work/out/vmlinuz" "$work/out/vmlinux.btf"
    local types
    types="$(bpftool btf dump file "$work/out/vmlinux.btf" 2>/dev/null | grep -c '^\[[0-9]*\] ' || true)"
    [[ $types -ge 50000 ]] || die "$name: bpftool reads only $types types from the BTF of $release"
    log "  resolving modules through modules.dep"
    resolve_modules "$moddir" "$work/out/modules"
    echo "$release" >"$work/out/release"
    echo "$image_pkg${modules_pkg:+ $modules_pkg}${config_pkg:+ $config_pkg}" >"$work/out/package"
    echo "$types" >"$work/out/btf-types"
    rm -rf "$dir.old"
    [[ ! -e $dir ]] || mv "$dir" "$dir.old"
    mv "$work/out" "$dir"
    rm -rf "$dir.old" "$work"
    trap - EXIT
    log "$name: $release ready in $((SECONDS - t0)) s ($types BTF types, $(du -sm "$dir" | cut -f1) MiB in $dir)"
}

setup_apt
T0=$SECONDS
for line in "${todo[@]}"; do
    # shellcheck disable=SC2086 # the list's columns
    fetch_kernel $line
done
log "fetched ${#todo[@]} kernel(s) in $((SECONDS - T0)) s"
