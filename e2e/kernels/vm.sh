#!/usr/bin/env bash
# Real-kernel nodes: Debian kernels (e2e/kernels/kernels.list, fetched by fetch.sh) booted in
# qemu microVMs under TCG, each running `bpfpoly-agent run` as its own node against the
# host's API server.
#
#   bash e2e/kernels/vm.sh start KERNEL...   fetch, build the initramfs, create the Node, boot
#   bash e2e/kernels/vm.sh wait KERNEL...    wait (with boot progress) until each agent runs
#   bash e2e/kernels/vm.sh stop [KERNEL...]  power the VMs off and delete their Nodes (default: all)
#   bash e2e/kernels/vm.sh kill KERNEL       power one off abruptly (SIGKILL: a node lost)
#   bash e2e/kernels/vm.sh status            which VMs run
#   bash e2e/kernels/vm.sh verify KERNEL OBJDIR CONSOLE
#                                            boot KERNEL without a network, run `bpftool prog
#                                            loadall` and `bpfpoly-agent verify` on every
#                                            object of OBJDIR, write the console, power off
#   bash e2e/kernels/vm.sh node-name KERNEL  the node name of a kernel (5.10 -> debian-5-10)
#
# Network: ONLY qemu's user network with restrict=on. The guest reaches the API server on the
# host's loopback through `guestfwd=tcp:10.0.2.100:PORT-cmd:socat - TCP:127.0.0.1:PORT` (the
# serving certificate covers 10.0.2.100, see e2e/env/cluster.sh), and the host reads the guest
# agent's /metrics through a hostfwd bound to 127.0.0.1. Nothing else is reachable either way.
#
# Environment: BPFPOLY_APISERVER_PORT (16443), BPFPOLY_CONFIGMAP_NAMESPACES (bpfpoly-system: where
# the guest agents may read bytecode ConfigMaps), BPFPOLY_VM_METRICS_BASE (9470: the agent of the
# i-th kernel in kernels.list is at 127.0.0.1:BASE+i), BPFPOLY_VM_MEMORY (768 MiB),
# KUBECONFIG (the admin kubeconfig of e2e/env/cluster.sh, used to create the Node objects and
# as the guest agent's credentials, with the server address rewritten).
# State: <repo>/.run/kernels/<KERNEL>/ (console.log, qemu.pid, initrd); initramfs builds in
# $CARGO_TARGET_DIR (or <repo>/target)/kernels/<KERNEL>/.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
AGENT="$TARGET/release/bpfpoly-agent"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
RUN="$REPO/.run/kernels"
API_PORT="${BPFPOLY_APISERVER_PORT:-16443}"
METRICS_BASE="${BPFPOLY_VM_METRICS_BASE:-9470}"
MEMORY="${BPFPOLY_VM_MEMORY:-768}"
BOOT_TIMEOUT="${BPFPOLY_VM_BOOT_TIMEOUT:-240}"
export KUBECONFIG="${KUBECONFIG:-$REPO/.run/cluster/kubeconfig}"

log() { echo "[bpfpoly] vm: $*" >&2; }
die() { echo "[bpfpoly] ERROR: vm: $*" >&2; exit 1; }

known() { awk '!/^#/ && NF {print $1}' "$HERE/kernels.list"; }
index_of() { known | awk -v k="$1" '$1 == k {print NR - 1; f=1} END {exit !f}'; }
check_kernel() { index_of "$1" >/dev/null || die "unknown kernel '$1' (known: $(known | tr '\n' ' '))"; }
node_name() { echo "debian-${1//./-}"; }
metrics_port() { echo $((METRICS_BASE + $(index_of "$1"))); }

alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ ${stat%% *} != Z ]]
}

# The PID of this kernel's qemu if it runs and is ours (its command line names our run dir).
qemu_pid() {
    local f="$RUN/$1/qemu.pid" pid
    [[ -s $f ]] || return 0
    pid="$(tr -d ' \n' <"$f")"
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$RUN/$1/" && echo "$pid"
    return 0
}

# --- the initramfs ------------------------------------------------------------------------

# base.cpio: busybox, the agent (its eBPF objects are built in) and its libraries, the
# kernel's modules, /init. Rebuilt when the agent, the init or the modules are newer.
build_base() {
    local k=$1 out="$TARGET/kernels/$1" mods="$CACHE/kernels/$1/modules"
    local cpio="$out/base.cpio"
    [[ -x $AGENT ]] || die "$AGENT missing: cargo build --release -p bpfpoly-agent"
    if [[ -s $cpio && $cpio -nt $AGENT && $cpio -nt $HERE/guest-init && $cpio -nt $mods/load.order && $cpio -nt $CACHE/kernels/$k/config ]]; then
        return 0
    fi
    local root="$out/root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,boot,etc/bpfpoly,lib/modules,lib64,proc,sys,dev,tmp,run}
    cp "$CACHE/kernels/$k/config" "$root/boot/config-$(cat "$CACHE/kernels/$k/release")"
    cp /bin/busybox "$root/bin/busybox"
    strip -o "$root/bin/bpfpoly-agent" "$AGENT" 2>/dev/null || cp "$AGENT" "$root/bin/bpfpoly-agent"
    # The agent's shared libraries (libc, libm, libgcc_s, the dynamic loader).
    local lib
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$AGENT" | grep -o '/[^ ]*' | sort -u)
    cp "$mods"/*.ko "$mods/load.order" "$root/lib/modules/"
    cp "$HERE/guest-init" "$root/init"
    chmod 755 "$root/init"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$cpio.tmp"
    mv -f "$cpio.tmp" "$cpio"
    rm -rf "$root"
    log "$k: initramfs $cpio ($(du -m "$cpio" | cut -f1) MiB)"
}

# node.cpio: this node's name, credentials and ports, appended to base.cpio (the kernel
# unpacks concatenated archives in order). Never cached: it holds the token.
build_node_cpio() {
    local k=$1 dir=$RUN/$1 node server token ca
    node="$(node_name "$k")"
    mkdir -p "$dir/root/etc/bpfpoly"
    chmod 700 "$dir" "$dir/root"
    [[ -s $KUBECONFIG ]] || die "no kubeconfig at $KUBECONFIG (start the cluster: bash e2e/env/cluster.sh up)"
    server="$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')"
    token="$(kubectl config view --raw --minify -o jsonpath='{.users[0].user.token}')"
    ca="$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
    [[ -n $token && -n $ca ]] || die "$KUBECONFIG has no token or CA data"
    [[ $server == "https://127.0.0.1:$API_PORT" ]] \
        || die "$KUBECONFIG points at $server, not https://127.0.0.1:$API_PORT (set BPFPOLY_APISERVER_PORT)"
    umask 077
    cat >"$dir/root/etc/bpfpoly/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bpfpoly-local
  cluster:
    server: https://10.0.2.100:$API_PORT
    certificate-authority-data: $ca
users:
- name: $node
  user:
    token: $token
contexts:
- name: $node@bpfpoly-local
  context: {cluster: bpfpoly-local, user: $node}
current-context: $node@bpfpoly-local
EOF
    cat >"$dir/root/etc/bpfpoly/node.env" <<EOF
NODE_NAME=$node
API_PORT=$API_PORT
HOST_EPOCH=$(date +%s)
TRAFFIC_INTERVAL=${BPFPOLY_VM_TRAFFIC_INTERVAL:-2}
CONFIGMAP_NAMESPACES=${BPFPOLY_CONFIGMAP_NAMESPACES:-bpfpoly-system}
EOF
    (cd "$dir/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$dir/node.cpio"
    umask 022
    rm -rf "$dir/root"
    cat "$TARGET/kernels/$k/base.cpio" "$dir/node.cpio" >"$dir/initrd"
    rm -f "$dir/node.cpio"
    chmod 600 "$dir/initrd"
}

# The Node object of a microVM node: no kubelet runs there, so a NoSchedule taint keeps
# every DaemonSet's Pods (the chart's agent included) off it; the kubelet's standard labels
# make ordinary nodeSelectors work.
apply_node() {
    local k=$1 node release
    node="$(node_name "$k")"
    release="$(cat "$CACHE/kernels/$k/release")"
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $node
  labels:
    kubernetes.io/hostname: $node
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    bpfpoly.io/microvm: "true"
    bpfpoly.io/kubelet: "none"
    bpfpoly.io/kernel: "$k"
  annotations:
    bpfpoly.io/note: "Debian kernel $release in a qemu microVM on this host (e2e/kernels/vm.sh); bpfpoly-agent runs there, no kubelet"
spec:
  taints:
  - {key: bpfpoly.io/no-kubelet, value: "true", effect: NoSchedule}
EOF
}

# --- a verifier run -------------------------------------------------------------------------

# verify.cpio: bpftool and its libraries, the objects of OBJDIR, and /etc/bpfpoly/verify
# (which makes the guest's /init run the verifier comparison and power off instead of
# joining the cluster). Appended to base.cpio.
cmd_verify() { # KERNEL OBJDIR CONSOLE
    local k=$1 objdir=$2 console=$3 work tool lib
    check_kernel "$k"
    [[ -d $objdir ]] || die "verify: no object directory $objdir"
    tool="$(command -v bpftool)" || die "verify: bpftool missing (apt-get install bpftool)"
    bash "$HERE/fetch.sh" "$k"
    build_base "$k"
    work="$(mktemp -d "$TARGET/kernels/$k/verify.XXXXXX")"
    mkdir -p "$work/root/bin" "$work/root/objects" "$work/root/etc/bpfpoly"
    cp -L "$tool" "$work/root/bin/bpftool"
    while read -r lib; do
        mkdir -p "$work/root$(dirname "$lib")"
        cp -L "$lib" "$work/root$lib"
    done < <(ldd "$tool" | grep -o '/[^ ]*' | sort -u)
    cp "$objdir"/*.o "$work/root/objects/"
    echo "HOST_EPOCH=$(date +%s)" >"$work/root/etc/bpfpoly/verify"
    (cd "$work/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$work/verify.cpio"
    cat "$TARGET/kernels/$k/base.cpio" "$work/verify.cpio" >"$work/initrd"
    : >"$console"
    log "$k: verifier run on $(find "$objdir" -maxdepth 1 -name '*.o' | wc -l) objects (console $console)"
    # No network device at all: the guest only loads programs and prints to its console.
    # -no-reboot: its poweroff ends qemu; the timeout bounds a guest that hangs.
    local rc=0
    timeout "${BPFPOLY_VERIFY_TIMEOUT:-600}" qemu-system-x86_64 -name "bpfpoly-verify-$k" -accel tcg -cpu max -smp 1 -m "$MEMORY" \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "file:$console" -monitor none \
        -kernel "$CACHE/kernels/$k/vmlinuz" -initrd "$work/initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on" \
        -device virtio-rng-pci </dev/null >"$work/qemu.log" 2>&1 || rc=$?
    [[ $rc -eq 0 ]] || { cat "$work/qemu.log" >&2; tail -n 20 "$console" >&2; rm -rf "$work"; die "$k: the verifier guest did not power off (qemu status $rc)"; }
    rm -rf "$work"
    grep -aq 'bpfpoly-verify: done' "$console" || { tail -n 20 "$console" >&2; die "$k: the verifier guest did not finish (console: $console)"; }
}

# --- commands ------------------------------------------------------------------------------

cmd_start() {
    local k
    [[ $# -gt 0 ]] || die "usage: vm.sh start KERNEL..."
    for k in "$@"; do check_kernel "$k"; done
    [[ $(id -u) -eq 0 ]] || die "the microVMs' agents load eBPF programs into their own kernels, but qemu and the bpffs cleanup here run as root: run as root"
    bash "$REPO/e2e/env/install-deps.sh" --apt qemu-system-x86 busybox-static cpio socat
    bash "$HERE/fetch.sh" "$@"
    for k in "$@"; do
        build_base "$k"
        if [[ -n $(qemu_pid "$k") ]]; then
            log "$k: already running (pid $(qemu_pid "$k"))"
            continue
        fi
        mkdir -p "$RUN/$k"
        build_node_cpio "$k"
        apply_node "$k"
        local port
        port="$(metrics_port "$k")"
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
            && die "$k: metrics port 127.0.0.1:$port is taken (set BPFPOLY_VM_METRICS_BASE)"
        : >"$RUN/$k/console.log"
        rm -f "$RUN/$k/qemu.pid"
        # -no-reboot: a guest that powers off or panics (panic=-1) ends qemu.
        # -daemonize: qemu detaches (re-parented to init, which reaps it) once it runs.
        qemu-system-x86_64 -name "bpfpoly-$k" -accel tcg -cpu max -smp 1 -m "$MEMORY" \
            -nodefaults -no-user-config -display none -daemonize -no-reboot \
            -serial "file:$RUN/$k/console.log" -monitor none \
            -kernel "$CACHE/kernels/$k/vmlinuz" -initrd "$RUN/$k/initrd" \
            -append "console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on" \
            -device virtio-rng-pci \
            -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:9464,guestfwd=tcp:10.0.2.100:$API_PORT-cmd:socat - TCP:127.0.0.1:$API_PORT" \
            -device virtio-net-pci,netdev=n0,romfile= \
            -pidfile "$RUN/$k/qemu.pid" \
            </dev/null >"$RUN/$k/qemu.log" 2>&1 \
            || { cat "$RUN/$k/qemu.log" >&2; die "$k: qemu did not start"; }
        local i
        for i in $(seq 50); do [[ -s $RUN/$k/qemu.pid ]] && break; sleep 0.1; done
        [[ -n $(qemu_pid "$k") ]] || { cat "$RUN/$k/qemu.log" >&2; die "$k: qemu did not start"; }
        log "$k: booting $(cat "$CACHE/kernels/$k/release") as node $(node_name "$k") (console .run/kernels/$k/console.log, metrics 127.0.0.1:$port)"
    done
}

cmd_wait() {
    local k t0=$SECONDS pending=("$@") still line
    [[ $# -gt 0 ]] || die "usage: vm.sh wait KERNEL..."
    declare -A seen=()
    while [[ ${#pending[@]} -gt 0 ]]; do
        still=()
        for k in "${pending[@]}"; do
            # Boot progress: every new "bpfpoly-guest:" line of the console.
            while IFS= read -r line; do
                [[ -n ${seen[$k:$line]:-} ]] && continue
                seen[$k:$line]=1
                log "$k: ${line#*bpfpoly-guest: } (+$((SECONDS - t0)) s)"
            done < <(grep -a 'bpfpoly-guest:' "$RUN/$k/console.log" 2>/dev/null || true)
            if grep -aq 'bpfpoly-guest: FAILED\|bpfpoly-guest: agent exited\|Kernel panic' "$RUN/$k/console.log" 2>/dev/null; then
                tail -n 30 "$RUN/$k/console.log" >&2
                die "$k: the guest failed (console: $RUN/$k/console.log)"
            fi
            if curl -s --max-time 2 "http://127.0.0.1:$(metrics_port "$k")/readyz" >/dev/null 2>&1; then
                log "$k: agent ready on node $(node_name "$k") after $((SECONDS - t0)) s"
                continue
            fi
            if [[ -z $(qemu_pid "$k") ]]; then
                tail -n 30 "$RUN/$k/console.log" >&2 || true
                cat "$RUN/$k/qemu.log" >&2 || true
                die "$k: qemu is not running (console: $RUN/$k/console.log)"
            fi
            still+=("$k")
        done
        pending=("${still[@]}")
        [[ ${#pending[@]} -eq 0 ]] && break
        if ((SECONDS - t0 > BOOT_TIMEOUT)); then
            for k in "${pending[@]}"; do tail -n 20 "$RUN/$k/console.log" >&2 || true; done
            die "not ready after $BOOT_TIMEOUT s: ${pending[*]}"
        fi
        sleep 1
    done
}

stop_one() { # KERNEL SIGNAL
    local k=$1 sig=$2 pid i
    pid="$(qemu_pid "$k")"
    if [[ -z $pid ]]; then
        rm -f "$RUN/$k/qemu.pid"
        return 0
    fi
    kill "-$sig" "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; }
    alive "$pid" && die "$k: qemu (pid $pid) did not exit"
    rm -f "$RUN/$k/qemu.pid" "$RUN/$k/initrd"
    log "$k: powered off (SIG$sig to qemu $pid)"
}

cmd_stop() {
    local k ks=("$@")
    [[ $# -gt 0 ]] || mapfile -t ks < <(known)
    for k in "${ks[@]}"; do
        stop_one "$k" TERM
        # A node powered off on purpose is gone from the cluster too: a Node left behind
        # would be selected (and waited for, as a rollout's canary) by the next run.
        kubectl delete node "$(node_name "$k")" --ignore-not-found --wait=false --request-timeout=5s \
            >/dev/null 2>&1 || true
    done
}

cmd_status() {
    local k pid
    for k in $(known); do
        pid="$(qemu_pid "$k")"
        if [[ -n $pid ]]; then log "$k: running (pid $pid, node $(node_name "$k"), metrics 127.0.0.1:$(metrics_port "$k"))"; fi
    done
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    wait) shift; cmd_wait "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    kill) shift; [[ $# -eq 1 ]] || die "usage: vm.sh kill KERNEL"; stop_one "$1" KILL ;;
    status) cmd_status ;;
    node-name) node_name "$2" ;;
    metrics-port) metrics_port "$2" ;;
    list) known ;;
    verify) shift; [[ $# -eq 3 ]] || die "usage: vm.sh verify KERNEL OBJDIR CONSOLE"; cmd_verify "$@" ;;
    *) die "usage: vm.sh start|wait|stop|kill|status|verify|node-name|metrics-port|list ..." ;;
esac
