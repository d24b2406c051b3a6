#!/usr/bin/env bash
# Installs everything bpfpoly needs on a Debian 12 machine, idempotently:
# apt packages, Python wheels, the kube-apiserver and the node components (kubelet,
# kube-proxy, controller-manager, scheduler) built from Debian's source (build-kube.sh) and
# the BTF of Debian's 6.1 cloud kernel (fetch-btf.sh).
# A second run finds everything present and finishes in well under 2 s.
#
#   bash e2e/env/install-deps.sh                 everything (what `make deps` runs)
#   bash e2e/env/install-deps.sh --apt PKG...    only make sure these apt packages are installed
#                                            (used by the other e2e scripts)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"

log() { echo "[bpfpoly] $*" >&2; }
die() { echo "[bpfpoly] ERROR: $*" >&2; exit 1; }

# Everything the repo's builds, tests and local control plane use.
APT_PACKAGES=(
    clang llvm libbpf-dev bpftool          # eBPF objects (ebpf/)
    golang-go rsync make dpkg-dev xz-utils # building kube-apiserver from Debian's source
    golang-github-modern-go-reflect2-dev   # reflect2 1.0.2 for that build (see build-apiserver.sh)
    etcd-server openssl curl               # the local control plane (cluster.sh)
    lz4 zstd binutils                      # extracting real kernels' BTF (fetch-btf.sh)
    qemu-system-x86 busybox-static cpio socat kmod  # Debian kernels in microVMs (e2e/kernels/)
    libxdp1                                # xdp-dispatcher.o, the dispatch-overhead anchor
    iproute2                               # veth pairs for XDP/tc tests
    prometheus                             # metrics scraping in e2e
    python3 python3-pip ca-certificates    # helm-python-sdk (chart lint/render/install)
    containerd runc containernetworking-plugins iptables conntrack socat gcc libc6-dev
                                           # the real node (node.sh) and its pause image
)
PIP_REQUIREMENTS=("helm-python-sdk==0.2.2" "pyyaml")

need_root() {
    [[ $(id -u) -eq 0 ]] || die "installing packages needs root (run as root, or install by hand: $*)"
}

# Prints the packages among "$@" that are not installed (one dpkg-query for all: fast).
missing_apt() {
    local -A ok=()
    local pkg status
    while read -r pkg status; do
        [[ $status == installed ]] && ok[$pkg]=1
    done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null || true)
    for pkg in "$@"; do
        [[ -n ${ok[$pkg]:-} ]] || echo "$pkg"
    done
}

# Packages whose postinst would start a system service (etcd on the default ports,
# prometheus on :9090, ...) must not do so: the project starts its own instances on
# its own ports. policy-rc.d is Debian's switch for exactly that; it exists only
# while apt runs, and only if we created it.
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0
drop_policy_rc() {
    if [[ $POLICY_RC_OURS -eq 1 ]]; then rm -f "$POLICY_RC"; POLICY_RC_OURS=0; fi
}
trap drop_policy_rc EXIT

ensure_apt() {
    local missing
    mapfile -t missing < <(missing_apt "$@")
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    need_root "apt-get install ${missing[*]}"
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local t0=$SECONDS
    log "apt: apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed (are the apt sources reachable?)"
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi
    # Recommends are left out on purpose: prometheus would pull in (and start)
    # prometheus-node-exporter, python3-pip a whole compiler toolchain.
    mkdir -p "$CACHE"
    if ! apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" 2>&1 | tee "$CACHE/apt.log" | sed -u -n 's/^Setting up \([^ ]*\).*/[bpfpoly]   apt: set up \1/p' >&2; then
        tail -n 30 "$CACHE/apt.log" >&2
        die "apt-get install ${missing[*]} failed (full log: $CACHE/apt.log)"
    fi
    drop_policy_rc
    mapfile -t missing < <(missing_apt "$@")
    [[ ${#missing[@]} -eq 0 ]] || die "still missing after apt-get install: ${missing[*]}"
    log "apt: done in $((SECONDS - t0)) s"
}

if [[ ${1:-} == --apt ]]; then
    shift
    [[ $# -gt 0 ]] && ensure_apt "$@"
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: $0 [--apt PKG...]"

[[ -r /etc/debian_version ]] || die "this script expects Debian 12 (bookworm)"

pkgs=("${APT_PACKAGES[@]}")
# Debian's kubectl (kubernetes-client, 1.20.2, the same version as the API server)
# only when there is no kubectl yet: another kubectl package would conflict with it.
command -v kubectl >/dev/null 2>&1 || pkgs+=(kubernetes-client)
ensure_apt "${pkgs[@]}"

# --- Python wheels -----------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 not found after installing python3"
if ! python3 - "${PIP_REQUIREMENTS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
for req in sys.argv[1:]:
    name, _, want = req.partition("==")
    have = metadata.version(name)
    if want and have != want:
        sys.exit(1)
import helm_python, yaml  # noqa: E401,F401  (the imports the project uses)
EOF
then
    log "pip: installing ${PIP_REQUIREMENTS[*]} for $(command -v python3)"
    pip_args=(--disable-pip-version-check --no-input --root-user-action=ignore)
    # Debian's own python3 is "externally managed" (PEP 668) and refuses plain
    # `pip install`; a pyenv or venv python is not and must not get the flag.
    if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' \
        && [[ -z ${VIRTUAL_ENV:-} ]]; then
        pip_args+=(--break-system-packages)
    fi
    python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip ($(command -v python3)); install python3-pip or use a python with pip"
    mkdir -p "$CACHE"
    if ! python3 -m pip install "${pip_args[@]}" "${PIP_REQUIREMENTS[@]}" 2>&1 | tee "$CACHE/pip.log" \
        | sed -u -n 's/^\(Collecting\|Successfully installed\) /[bpfpoly]   pip: \1 /p' >&2; then
        tail -n 30 "$CACHE/pip.log" >&2
        die "pip install ${PIP_REQUIREMENTS[*]} failed (full log: $CACHE/pip.log)"
    fi
    python3 -c 'import helm_python, yaml' || die "helm_python / yaml still not importable by $(command -v python3)"
    log "pip: done"
fi

# --- kube-apiserver and real-kernel BTF (cached; no-ops when present) ----------
bash "$HERE/build-apiserver.sh"
bash "$HERE/build-kube.sh" kubelet kube-proxy kube-controller-manager kube-scheduler
bash "$HERE/fetch-btf.sh"
log "deps: all present"
