#!/usr/bin/env bash
# A real single node on this machine, beside the local control plane (cluster.sh): containerd
# (Debian's, CRI plugin + runc) with its own directories, a CNI bridge with host-local IPAM,
# the kubelet (registering node `local`), kube-proxy in iptables mode, kube-controller-manager
# and kube-scheduler, all Kubernetes 1.20.2 built from Debian's source (build-kube.sh), plus the
# pause image built from that tree's build/pause/.
#
#   bash e2e/env/node.sh up       start (cluster.sh up first; idempotent)
#   bash e2e/env/node.sh down     stop by PID what `up` started and remove exactly what it created:
#                             containers and their mounts, the bridge, the iptables chains and
#                             rules, the sysctls the kubelet and kube-proxy changed (restored), the
#                             host paths it created; the Node object is deleted
#   bash e2e/env/node.sh status   what runs (exit 0 when the node is Ready)
#   bash e2e/env/node.sh running  exit 0 when any process `up` started still runs (quiet)
#   bash e2e/env/node.sh ctr ARGS ctr against this containerd (namespace k8s.io)
#
# Networking stays on this machine: Pods get addresses of $POD_CIDR on the bridge $BRIDGE
# (default bpncni0, 10.203.0.0/24), in network namespaces containerd makes; the bridge's
# address is the node's InternalIP and Pods' default gateway. Nothing is masqueraded and IP
# forwarding is left as it is. The API server listens on 127.0.0.1 only, and Endpoints may not
# hold a loopback address, so the `kubernetes` Service points at $GATEWAY:$API_PORT, where a
# socat (started here) relays to 127.0.0.1:$API_PORT. Pods reach it through kube-proxy's rules.
#
# Everything lives under <repo>/.run/node/. Ports (all on 127.0.0.1 or the bridge address):
# kubelet 10250 + healthz 10248, kube-proxy 10249/10256, controller-manager 10257, scheduler
# 10259; only one such node can run on a machine.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RUN="$REPO/.run/node"
CLUSTER_RUN="$REPO/.run/cluster"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
BIN="$CACHE/bin"
API_PORT="${BPFPOLY_APISERVER_PORT:-16443}"
BRIDGE="${BPFPOLY_NODE_BRIDGE:-bpncni0}"
POD_NET="${BPFPOLY_POD_NET:-10.203.0}" # a /24: .1 is the bridge, Pods get .2-.254
POD_CIDR="$POD_NET.0/24"
GATEWAY="$POD_NET.1"
SERVICE_CIDR=10.0.0.0/24 # cluster.sh's --service-cluster-ip-range
NODE_NAME=local
PAUSE_IMAGE=bpfpoly.local/pause:3.4.1
SOCK="$RUN/containerd/containerd.sock"
KUBECONFIG_ADMIN="$CLUSTER_RUN/kubeconfig"
# The node's components use a copy of the admin kubeconfig (and so name $RUN on their
# command line, which is how our_pid knows them).
KUBECONFIG_NODE="$RUN/kubeconfig"
READY_TIMEOUT="${BPFPOLY_NODE_READY_TIMEOUT:-120}"
COMPONENTS=(kubelet kube-proxy kube-controller-manager kube-scheduler)
# Sysctls the kubelet (setupKernelTunables) and kube-proxy (route_localnet) set; saved at up,
# restored at down.
SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/conf/all/route_localnet)
# Host paths the kubelet and containerd use outside their own directories; the ones missing
# at up are removed at down.
HOST_PATHS=(/var/log/pods /var/log/containers /run/containerd /sys/fs/cgroup/cpu/kubepods
    /sys/fs/cgroup/cpuacct/kubepods /sys/fs/cgroup/cpuset/kubepods /sys/fs/cgroup/memory/kubepods
    /sys/fs/cgroup/devices/kubepods /sys/fs/cgroup/freezer/kubepods /sys/fs/cgroup/blkio/kubepods
    /sys/fs/cgroup/pids/kubepods /sys/fs/cgroup/systemd/kubepods /sys/fs/cgroup/unified/kubepods
    /sys/fs/cgroup/hugetlb/kubepods /sys/fs/cgroup/net_cls/kubepods /sys/fs/cgroup/perf_event/kubepods)

# Belt and braces beside build-kube.sh's patch: no AWS SDK code in these binaries may ask
# the cloud metadata address for anything.
export AWS_EC2_METADATA_DISABLED=true

log() { echo "[node] $*" >&2; }
die() { echo "[node] ERROR: $*" >&2; exit 1; }
kc() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ ${stat%% *} != Z ]]
}

# The PID in $RUN/<name>.pid when alive and ours (its command line names $RUN).
our_pid() {
    local name=$1 pid cmdline
    [[ -s $RUN/$name.pid ]] || return 0
    pid="$(<"$RUN/$name.pid")"
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 0
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ $cmdline == *"$RUN"* ]] && echo "$pid"
    return 0
}

start_daemon() {
    local name=$1
    shift
    [[ -n $(our_pid "$name") ]] && return 0
    rm -f "$RUN/$name.pid"
    echo "===== $(date -Is) $*" >>"$RUN/$name.log"
    # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN/$name.pid" "$@" >>"$RUN/$name.log" 2>&1 </dev/null &
    local i
    for i in $(seq 50); do
        [[ -s $RUN/$name.pid ]] && return 0
        sleep 0.1
    done
    die "$name did not start (see $RUN/$name.log)"
}

stop_daemon() {
    local name=$1 pid i
    [[ -e $RUN/$name.pid ]] || return 0
    pid="$(our_pid "$name")"
    if [[ -z $pid ]]; then
        rm -f "$RUN/$name.pid"
        return 0
    fi
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 200); do
        alive "$pid" || break
        [[ $i -eq 150 ]] && { log "$name: still running after 15 s; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
        sleep 0.1
    done
    alive "$pid" && die "$name (pid $pid) did not exit"
    rm -f "$RUN/$name.pid"
}

wait_for() { # wait_for SECONDS WHAT COMMAND...
    local secs=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < secs)) || return 1
        sleep 0.5
    done
    log "$what ($((SECONDS - t0)) s)"
}

show_log_tail() {
    echo "----- last 30 lines of $RUN/$1.log -----" >&2
    tail -n 30 "$RUN/$1.log" >&2 || true
}

# --- the pause image ----------------------------------------------------------------

# build/pause/linux/pause.c of the Debian source tree, linked statically, in a one-layer OCI
# image (e2e/env/oci-image.py). Cached as $CACHE/images/pause.tar.
pause_image() {
    local tar="$CACHE/images/pause.tar" src tree
    [[ -s $tar ]] && { echo "$tar"; return 0; }
    tree="$(ls -d "$CACHE"/src/kubernetes-*/ 2>/dev/null | head -n 1)"
    src="${tree}build/pause/linux/pause.c"
    [[ -f $src ]] || die "pause source $src missing (bash e2e/env/build-kube.sh unpacks the tree)"
    mkdir -p "$CACHE/images" "$RUN/pause-root"
    log "pause: compiling $src statically"
    gcc -Os -Wall -Werror -static -DVERSION=v3.4.1-bpfpoly -o "$RUN/pause-root/pause" "$src"
    strip "$RUN/pause-root/pause"
    python3 "$HERE/oci-image.py" --name "$PAUSE_IMAGE" --entrypoint /pause --user 65535:65535 \
        --file "$RUN/pause-root/pause:/pause" --out "$tar.tmp" >&2
    mv -f "$tar.tmp" "$tar"
    echo "$tar"
}

# --- configuration -----------------------------------------------------------------

write_configs() {
    mkdir -p "$RUN/containerd" "$RUN/cni/net.d" "$RUN/cni/ipam" "$RUN/kubelet" "$RUN/pki"
    cat >"$RUN/containerd/config.toml" <<EOF
# Written by e2e/env/node.sh: containerd for the bpfpoly node, nothing outside $RUN.
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "$RUN/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # Lowering an oom_score_adj below containerd's own is refused on this machine (and needs
  # privileges a container host may not grant): keep every container at or above it.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$RUN/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$RUN/containerd/certs.d"
EOF
    # No registry is ever contacted: every registry host (_default) resolves to a closed
    # loopback port, so a pull of an image that is not imported fails at once, without a DNS
    # lookup or a packet leaving the machine (ErrImagePull names the image).
    mkdir -p "$RUN/containerd/certs.d/_default"
    cat >"$RUN/containerd/certs.d/_default/hosts.toml" <<EOF
server = "http://127.0.0.1:9"
[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF
    # No isGateway: the bridge's address is set here (so the plugin leaves IP forwarding
    # alone); no ipMasq: nothing leaves the machine.
    # Written aside and moved in: containerd reloads the directory on every write.
    cat >"$RUN/cni/10-bpfpoly.conflist.tmp" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "bpfpoly-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$RUN/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "$GATEWAY"}]
      }
    }
  ]
}
EOF
    mv -f "$RUN/cni/10-bpfpoly.conflist.tmp" "$RUN/cni/net.d/10-bpfpoly.conflist"
}

# --- up ------------------------------------------------------------------------------

save_host_state() {
    [[ -s $RUN/host-state ]] && return 0
    local s p
    {
        for s in "${SYSCTLS[@]}"; do echo "sysctl $s $(<"/proc/sys/$s")"; done
        for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] || echo "created $p"; done
        [[ $(stat -f -c %T /sys/fs/bpf 2>/dev/null) == bpf_fs ]] || echo "mounted /sys/fs/bpf"
        [[ $(stat -f -c %T /sys/kernel/tracing 2>/dev/null) == tracefs ]] || echo "mounted /sys/kernel/tracing"
        echo "propagation /sys/fs/bpf $(findmnt -n -o PROPAGATION /sys/fs/bpf 2>/dev/null || echo private)"
        echo "propagation /sys/kernel/tracing $(findmnt -n -o PROPAGATION /sys/kernel/tracing 2>/dev/null || echo private)"
    } >"$RUN/host-state.tmp"
    mv -f "$RUN/host-state.tmp" "$RUN/host-state"
}

ipt_chains() { # chains named KUBE-* or CNI-* in every table, for iptables and ip6tables
    local t cmd
    for cmd in iptables ip6tables; do
        for t in filter nat mangle; do
            "$cmd" -w -t "$t" -S 2>/dev/null | awk -v c="$cmd" -v t="$t" '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print c, t, $2}'
        done
    done
}

check_host() {
    [[ $(id -u) -eq 0 ]] || die "a kubelet node needs root"
    local c
    for c in "${COMPONENTS[@]}"; do [[ -x $BIN/$c ]] || die "$BIN/$c missing"; done
    [[ -z $(swapon --noheadings 2>/dev/null) ]] || log "swap is on: the kubelet runs with --fail-swap-on=false"
    if ip link show "$BRIDGE" >/dev/null 2>&1 && [[ ! -e $RUN/bridge ]]; then
        die "interface $BRIDGE exists and was not made here; set BPFPOLY_NODE_BRIDGE"
    fi
    if [[ ! -e $RUN/iptables-before ]]; then
        local foreign
        foreign="$(ipt_chains)"
        [[ -z $foreign ]] || die "iptables already has KUBE-/CNI- chains this script did not make (another Kubernetes node?): $(echo "$foreign" | tr '\n' ' ')"
        : >"$RUN/iptables-before"
    fi
    if pgrep -x kubelet >/dev/null 2>&1 && [[ -z $(our_pid kubelet) ]]; then
        die "another kubelet runs on this machine (pid $(pgrep -x kubelet | head -n 1))"
    fi
}

mount_host_fs() {
    if [[ $(stat -f -c %T /sys/fs/bpf 2>/dev/null) != bpf_fs ]]; then
        log "mounting bpffs on /sys/fs/bpf"
        mount -t bpf bpf /sys/fs/bpf
    fi
    if [[ $(stat -f -c %T /sys/kernel/tracing 2>/dev/null) != tracefs ]]; then
        log "mounting tracefs on /sys/kernel/tracing"
        mount -t tracefs tracefs /sys/kernel/tracing
    fi
    # Bidirectional (privileged agent) needs a shared source mount, HostToContainer a shared
    # or slave one.
    mount --make-shared /sys/fs/bpf
    mount --make-shared /sys/kernel/tracing
}

setup_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "bridge $BRIDGE with $GATEWAY/24"
        ip link add "$BRIDGE" type bridge
        touch "$RUN/bridge"
    fi
    ip addr replace "$GATEWAY/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # Service addresses are rewritten by kube-proxy's nat rules only after the kernel has
    # routed the packet: a host (or network namespace) without a default route, where the
    # host-network agent's connect to the `kubernetes` Service would fail with "network
    # unreachable", gets a route for the service range onto the bridge (removed at down).
    if ! ip route get "${SERVICE_CIDR%.*/*}.1" >/dev/null 2>&1; then
        log "no route to the service range $SERVICE_CIDR: routing it onto $BRIDGE"
        ip route replace "$SERVICE_CIDR" dev "$BRIDGE"
        touch "$RUN/service-route"
    fi
}

# The `kubernetes` Service's endpoint: $GATEWAY:$API_PORT, relayed to the API server.
setup_api_endpoint() {
    start_daemon api-relay socat -lf "$RUN/api-relay.socat.log" "TCP-LISTEN:$API_PORT,bind=$GATEWAY,fork,reuseaddr" "TCP:127.0.0.1:$API_PORT"
    # kube-proxy 1.20 reads EndpointSlices: one written here beside the Endpoints (which
    # the mirroring controller is told to skip, so there is exactly one slice).
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: {endpointslice.kubernetes.io/skip-mirror: "true"}
subsets:
- addresses: [{ip: "$GATEWAY"}]
  ports: [{name: https, port: $API_PORT, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: bpfpoly-node.sh
addressType: IPv4
endpoints:
- addresses: ["$GATEWAY"]
  conditions: {ready: true}
ports: [{name: https, port: $API_PORT, protocol: TCP}]
EOF
}

api_has_node_flags() {
    local pid
    pid="$(<"$CLUSTER_RUN/kube-apiserver.pid")"
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--endpoint-reconciler-type none'
}

start_containerd() {
    start_daemon containerd containerd --config "$RUN/containerd/config.toml"
    wait_for 20 "containerd: ready at $SOCK" ctr --address "$SOCK" version \
        || { show_log_tail containerd; die "containerd did not answer on $SOCK"; }
    local tar
    tar="$(pause_image)"
    if ! ctr_ images ls -q | grep -qx "$PAUSE_IMAGE"; then
        ctr_ images import --no-unpack=false "$tar" >/dev/null
        log "pause: imported $PAUSE_IMAGE ($(du -k "$tar" | cut -f1) KiB)"
    fi
}

start_kubelet() {
    start_daemon kubelet "$BIN/kubelet" \
        --kubeconfig "$KUBECONFIG_NODE" \
        --hostname-override "$NODE_NAME" \
        --node-ip "$GATEWAY" \
        --address "$GATEWAY" \
        --healthz-bind-address 127.0.0.1 \
        --read-only-port 0 \
        --root-dir "$RUN/kubelet" \
        --cert-dir "$RUN/kubelet/pki" \
        --volume-plugin-dir "$RUN/kubelet/volume-plugins" \
        --container-runtime remote \
        --container-runtime-endpoint "unix://$SOCK" \
        --runtime-request-timeout 5m \
        --pod-infra-container-image "$PAUSE_IMAGE" \
        --cgroup-driver cgroupfs \
        --fail-swap-on=false \
        --oom-score-adj 0 \
        --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
        --eviction-hard 'memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
        --node-status-update-frequency 5s \
        --sync-frequency 10s \
        --authentication-token-webhook=false \
        --authorization-mode AlwaysAllow \
        --v 1
}

start_control() {
    start_daemon kube-proxy "$BIN/kube-proxy" \
        --kubeconfig "$KUBECONFIG_NODE" \
        --hostname-override "$NODE_NAME" \
        --proxy-mode iptables \
        --cluster-cidr "$POD_CIDR" \
        --healthz-bind-address 127.0.0.1:10256 \
        --metrics-bind-address 127.0.0.1:10249 \
        --conntrack-max-per-core 0 \
        --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 \
        --oom-score-adj 0 \
        --v 1
    mkdir -p "$RUN/controller-manager" "$RUN/scheduler"
    start_daemon kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$KUBECONFIG_NODE" \
        --bind-address 127.0.0.1 --port 0 \
        --cert-dir "$RUN/controller-manager" \
        --service-account-private-key-file "$CLUSTER_RUN/pki/sa.key" \
        --root-ca-file "$CLUSTER_RUN/pki/ca.crt" \
        --controllers '*,-csrsigning,-csrapproving,-csrcleaner,-nodeipam,-cloud-node-lifecycle,-service,-route' \
        --leader-elect=false \
        --node-monitor-grace-period 20s \
        --v 1
    start_daemon kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$KUBECONFIG_NODE" \
        --bind-address 127.0.0.1 --port 0 \
        --cert-dir "$RUN/scheduler" \
        --leader-elect=false \
        --v 1
}

node_ready() {
    [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

cmd_up() {
    local t0=$SECONDS
    bash "$HERE/install-deps.sh" --apt containerd runc containernetworking-plugins iptables conntrack socat gcc libc6-dev
    bash "$HERE/build-kube.sh" "${COMPONENTS[@]}"
    bash "$HERE/cluster.sh" up >/dev/null
    api_has_node_flags || die "the running API server lacks the node flags (--endpoint-reconciler-type none); restart it: bash e2e/env/cluster.sh down && bash e2e/env/cluster.sh up"
    mkdir -p "$RUN"
    check_host
    save_host_state
    write_configs
    install -m 0600 "$KUBECONFIG_ADMIN" "$KUBECONFIG_NODE"
    mount_host_fs
    setup_bridge
    setup_api_endpoint
    start_containerd
    start_kubelet
    start_control
    local c
    for c in "${COMPONENTS[@]}" containerd api-relay; do
        [[ -n $(our_pid "$c") ]] || { show_log_tail "$c"; die "$c exited at start (log: $RUN/$c.log)"; }
    done
    if ! wait_for "$READY_TIMEOUT" "node $NODE_NAME: Ready" node_ready; then
        show_log_tail kubelet
        die "node $NODE_NAME not Ready after $READY_TIMEOUT s (logs: $RUN/*.log); \`bash e2e/env/node.sh down\` cleans up"
    fi
    log "node up in $((SECONDS - t0)) s: $NODE_NAME ($GATEWAY, pods $POD_CIDR on $BRIDGE)"
}

# --- down ----------------------------------------------------------------------------

# Containers: kill and delete every task and container of this containerd (the kubelet is
# stopped first, so nothing restarts them), then its shims, found by their -address.
remove_containers() {
    [[ -n $(our_pid containerd) ]] || return 0
    local ids id n=0
    mapfile -t ids < <(ctr_ containers ls -q 2>/dev/null)
    for id in "${ids[@]}"; do
        ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in "${ids[@]}"; do
        for _ in $(seq 50); do
            ctr_ tasks delete "$id" >/dev/null 2>&1 && break
            ctr_ tasks ls -q 2>/dev/null | grep -qx "$id" || break
            sleep 0.1
        done
        ctr_ containers delete "$id" >/dev/null 2>&1 && n=$((n + 1))
    done
    log "containers: removed $n"
}

stop_shims() {
    local pid cmdline
    for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true); do
        cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        [[ $cmdline == *"-address $SOCK"* ]] || continue
        log "shim pid $pid: stopping"
        kill -TERM "$pid" 2>/dev/null || true
    done
}

unmount_under() { # every mount under $1, deepest first (overlays, shm, netns, volumes)
    local m
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done < <(awk -v p="$1" '{gsub(/\\040/, " ", $5)} index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r)
}

remove_iptables() {
    [[ -e $RUN/iptables-before ]] || return 0
    local cmd t chain rule
    # Rules in any chain that jump to our chains, then the chains themselves.
    for cmd in iptables ip6tables; do
        for t in filter nat mangle; do
            while read -r rule; do
                eval "$cmd -w -t $t ${rule/-A /-D }" 2>/dev/null || true
            done < <("$cmd" -w -t "$t" -S 2>/dev/null | grep -E -- '^-A [A-Z]+ .*-j (KUBE|CNI)-' | grep -Ev '^-A (KUBE|CNI)-' || true)
        done
    done
    while read -r cmd t chain; do
        "$cmd" -w -t "$t" -F "$chain" 2>/dev/null || true
    done < <(ipt_chains)
    while read -r cmd t chain; do
        "$cmd" -w -t "$t" -X "$chain" 2>/dev/null || log "could not delete $cmd -t $t chain $chain"
    done < <(ipt_chains)
    rm -f "$RUN/iptables-before"
}

restore_host_state() {
    [[ -s $RUN/host-state ]] || return 0
    local what a b p
    while read -r what a b; do
        case "$what" in
            sysctl) [[ $(<"/proc/sys/$a") == "$b" ]] || echo "$b" >"/proc/sys/$a" ;;
        esac
    done <"$RUN/host-state"
    # Created paths deepest first (cgroups are removed with rmdir, children first).
    while read -r what a b; do
        [[ $what == created && -e $a ]] || continue
        case "$a" in
            /sys/fs/cgroup/*) find "$a" -depth -type d -exec rmdir {} \; 2>/dev/null || log "cgroup $a still in use" ;;
            *) rm -rf -- "${a:?}" ;;
        esac
    done <"$RUN/host-state"
    while read -r what a b; do
        if [[ $what == propagation && $b == private && -e $a ]]; then mount --make-private "$a" 2>/dev/null || true; fi
    done <"$RUN/host-state"
    while read -r what a b; do
        [[ $what == mounted ]] || continue
        if [[ $a == /sys/fs/bpf && -n $(ls -A /sys/fs/bpf 2>/dev/null | grep -v '\.debug$') ]]; then
            log "/sys/fs/bpf: mounted at up but holds pins now ($(ls -A /sys/fs/bpf | tr '\n' ' ')): left mounted"
            continue
        fi
        umount "$a" 2>/dev/null || log "$a: could not unmount (in use): left mounted"
    done <"$RUN/host-state"
    rm -f "$RUN/host-state"
}

cmd_down() {
    [[ -d $RUN ]] || { log "node not set up"; return 0; }
    # Node components first, so nothing restarts containers; then the containers.
    stop_daemon kubelet
    stop_daemon kube-scheduler
    stop_daemon kube-controller-manager
    stop_daemon kube-proxy
    remove_containers
    stop_daemon containerd
    stop_shims
    stop_daemon api-relay
    unmount_under "$RUN/"
    remove_iptables
    if [[ -e $RUN/service-route ]]; then
        ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true
        rm -f "$RUN/service-route"
    fi
    if [[ -e $RUN/bridge ]]; then
        ip link del "$BRIDGE" 2>/dev/null || true
        rm -f "$RUN/bridge"
    fi
    restore_host_state
    if [[ -s $KUBECONFIG_ADMIN ]] && kc get --raw /readyz >/dev/null 2>&1; then
        kc delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        kc delete endpoints kubernetes -n default --ignore-not-found >/dev/null 2>&1 || true
        kc delete endpointslices.discovery.k8s.io kubernetes -n default --ignore-not-found >/dev/null 2>&1 || true
    fi
    # Containerd's and the kubelet's data (images stay cached in $CACHE/images).
    rm -rf -- "${RUN:?}/containerd" "$RUN/kubelet" "$RUN/cni" "$RUN/pause-root"
    log "node down"
}

cmd_status() {
    local c pid rc=0
    for c in containerd api-relay "${COMPONENTS[@]}"; do
        pid="$(our_pid "$c")"
        if [[ -n $pid ]]; then log "$c: running (pid $pid)"; else log "$c: not running"; rc=3; fi
    done
    if node_ready; then log "node $NODE_NAME: Ready"; else log "node $NODE_NAME: not Ready"; rc=3; fi
    return $rc
}

cmd_running() {
    local c
    for c in containerd api-relay "${COMPONENTS[@]}"; do
        [[ -z $(our_pid "$c") ]] || return 0
    done
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    running) cmd_running ;;
    ctr) shift; ctr_ "$@" ;;
    *) die "usage: $0 up | down | status | running | ctr ARGS..." ;;
esac
