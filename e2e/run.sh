#!/usr/bin/env bash
# `make run` / `make stop`: a local bpfpoly on this machine.
#
#   run:  install what is missing, build, start the local control plane, the operator, the
#         agent of this machine and the real-kernel nodes, apply the samples, wait until they
#         settle, and show what was chosen where.
#   stop: stop what `run` started (by PID), power the microVMs off, unload the programs,
#         remove the veths, stop the control plane.
#
# Node `local` is this machine. Each kernel in BPFPOLY_KERNELS (default "6.1"; any of
# e2e/kernels/kernels.list: "5.10 6.1 6.12 7.2") is a real Debian kernel booted in a qemu
# microVM (e2e/kernels/vm.sh) whose own bpfpoly-agent is node debian-<version>, reaching the
# API server through the VM's guestfwd only.
#
# Ports and names (override for parallel runs): BPFPOLY_AGENT_METRICS_PORT (9464),
# BPFPOLY_OPERATOR_METRICS_PORT (9465), BPFPOLY_VM_METRICS_BASE (9470: the microVMs' agents),
# BPFPOLY_BPFFS_ROOT (/sys/fs/bpf/bpfpoly), BPFPOLY_VETH_PREFIX (bpfpoly: this machine's veth
# pairs PREFIX0/1 and PREFIX2/3; the samples name bpfpoly0-3, aliased when the prefix differs),
# and cluster.sh's BPFPOLY_ETCD_PORT, BPFPOLY_ETCD_PEER_PORT, BPFPOLY_APISERVER_PORT.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN="$REPO/.run"
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release"
KERNELS="${BPFPOLY_KERNELS-6.1}"
AGENT_PORT="${BPFPOLY_AGENT_METRICS_PORT:-9464}"
OPERATOR_PORT="${BPFPOLY_OPERATOR_METRICS_PORT:-9465}"
BPFFS_ROOT="${BPFPOLY_BPFFS_ROOT:-/sys/fs/bpf/bpfpoly}"
VETH="${BPFPOLY_VETH_PREFIX:-bpfpoly}"
VM="$REPO/e2e/kernels/vm.sh"
export KUBECONFIG="${KUBECONFIG:-$RUN/cluster/kubeconfig}"
say() { echo "[bpfpoly] $*"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_bg() { # name pidfile logfile cmd...
  local name=$1 pidfile=$2 log=$3; shift 3
  if pid_alive "$pidfile"; then
    say "$name already running (pid $(cat "$pidfile"))"
    return
  fi
  setsid nohup "$@" >"$log" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  say "started $name (pid $!, log ${log#"$REPO"/})"
}

stop_pid() { # name pidfile
  local name=$1 pidfile=$2
  if pid_alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    say "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

veth() { # a b
  ip link show "$1" >/dev/null 2>&1 || ip link add "$1" type veth peer name "$2"
  ip link set "$1" up; ip link set "$2" up
}

# ConfigMaps with bytecode are read from this namespace only.
BYTECODE_NS=bpfpoly-system
ALIASES=()
if [ "$VETH" != bpfpoly ]; then
  for i in 0 1 2 3; do ALIASES+=(--interface-alias "bpfpoly$i=$VETH$i"); done
fi

cmd_run() {
  [ "$(id -u)" = 0 ] || { echo "make run loads eBPF programs: run it as root" >&2; exit 1; }
  mkdir -p "$RUN"
  say "1/6 installing what is missing"
  bash "$REPO/e2e/install-deps.sh"
  say "2/6 building (eBPF objects and release binaries; a cold build takes a few minutes)"
  make -s -C "$REPO" ebpf
  # Cargo's own progress (crate counts), not -q: a cold build takes several minutes.
  (cd "$REPO" && cargo build --release -p bpfpoly-operator -p bpfpoly-agent 2>&1 \
     | sed -u -n -e 's/^ *Compiling \([^ ]*\) .*/[bpfpoly]   compiling \1/p' -e 's/^ *Finished .*/[bpfpoly]   &/p')
  say "3/6 starting the local control plane"
  bash "$REPO/e2e/cluster.sh" up >/dev/null
  kubectl apply -f "$REPO/crds/bpfpoly.io_crds.yaml" >/dev/null
  kubectl wait --for condition=established --timeout=30s crd/bpfpolyprograms.bpfpoly.io >/dev/null
  # The namespace whose ConfigMaps the agents read bytecode from (README: your own object).
  kubectl create namespace "$BYTECODE_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  say "4/6 nodes and veth pairs; booting the real-kernel nodes (${KERNELS:-none})"
  kubectl apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: local
  labels: {bpfpoly.io/host: this-machine}
EOF
  veth "${VETH}0" "${VETH}1"; veth "${VETH}2" "${VETH}3"
  # microVM nodes of an earlier run that this one does not boot: their Node objects go
  # (a rollout would wait for them forever).
  local keep=" " n
  for k in $KERNELS; do keep+="$(bash "$VM" node-name "$k") "; done
  for n in $(kubectl get nodes -l bpfpoly.io/microvm=true -o jsonpath='{.items[*].metadata.name}'); do
    case "$keep" in *" $n "*) ;; *) kubectl delete node "$n" --wait=false >/dev/null; say "deleted node $n (its microVM is not part of this run)" ;; esac
  done
  # The second agent on this host that earlier versions of make run started is retired; a
  # cluster kept from then still has its Node, which nothing answers for any more.
  for n in $(kubectl get nodes -l bpfpoly.io/second-agent-on-same-host=true -o jsonpath='{.items[*].metadata.name}'); do
    kubectl delete node "$n" --wait=false >/dev/null; say "deleted node $n (the retired second agent on this host)"
  done
  # shellcheck disable=SC2086 # a list of kernels
  [ -z "$KERNELS" ] || BPFPOLY_CONFIGMAP_NAMESPACES="$BYTECODE_NS" bash "$VM" start $KERNELS
  say "5/6 starting the operator and the agents"
  start_bg operator "$RUN/operator.pid" "$RUN/operator.log" \
    "$BIN/bpfpoly-operator" run --kubeconfig "$KUBECONFIG" --metrics-addr "127.0.0.1:$OPERATOR_PORT"
  start_bg "agent local" "$RUN/agent-local.pid" "$RUN/agent-local.log" \
    "$BIN/bpfpoly-agent" run --node-name local --kubeconfig "$KUBECONFIG" \
    --bpffs-root "$BPFFS_ROOT" --metrics-addr "127.0.0.1:$AGENT_PORT" \
    --allowed-bytecode-dirs "$RUN/bytecode" --configmap-namespaces "$BYTECODE_NS" ${ALIASES[@]+"${ALIASES[@]}"}
  # shellcheck disable=SC2086
  [ -z "$KERNELS" ] || bash "$VM" wait $KERNELS
  say "6/6 applying the samples in crds/examples/ and waiting for them to settle"
  kubectl apply -f "$REPO/crds/examples/" >/dev/null
  local deadline=$((SECONDS + 180)) not_ready
  while :; do
    not_ready=$(kubectl get bpp -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -v '=True$' || true)
    [ -z "$not_ready" ] && break
    if [ $SECONDS -ge $deadline ]; then
      say "not Ready after 180 s:"; echo "$not_ready"
      show
      exit 1
    fi
    printf '.'; sleep 2
  done
  echo
  show
}

show() {
  echo
  kubectl get bpp,bns,bnp
  for p in $(kubectl get bpp -o jsonpath='{.items[*].metadata.name}'); do
    echo
    "$BIN/bpfpoly-operator" explain "$p" --kubeconfig "$KUBECONFIG"
  done
  cat <<EOF

Metrics:   agent local http://127.0.0.1:$AGENT_PORT/metrics · operator http://127.0.0.1:$OPERATOR_PORT/metrics
$(for k in $KERNELS; do echo "           agent $(bash "$VM" node-name "$k") (Debian $k, microVM) http://127.0.0.1:$(bash "$VM" metrics-port "$k")/metrics"; done)
Logs:      .run/operator.log, .run/agent-local.log$(for k in $KERNELS; do printf ', .run/kernels/%s/console.log' "$k"; done)
kubectl:   export KUBECONFIG=$KUBECONFIG
           kubectl get bpp,bns,bnp; kubectl get events -n default
Explain:   target/release/bpfpoly-operator explain exec-tracer
Stop:      make stop
EOF
}

cmd_stop() {
  stop_pid operator "$RUN/operator.pid"
  stop_pid "agent local" "$RUN/agent-local.pid"
  # Every microVM this checkout started (their programs go with their kernels).
  bash "$VM" stop
  # SIGTERM leaves programs running by design; stop removes them, and the roots with them.
  for root in "$BPFFS_ROOT"; do
    if [ -x "$BIN/bpfpoly-agent" ] && [ -d "$root" ]; then
      "$BIN/bpfpoly-agent" cleanup --bpffs-root "$root" || true
    fi
    if [ -d "$root" ]; then say "WARNING: $root is still there"; fi
  done
  for l in "${VETH}0" "${VETH}2"; do ip link del "$l" 2>/dev/null || true; done
  bash "$REPO/e2e/cluster.sh" down
}

case "${1:-}" in
  run) cmd_run ;;
  stop) cmd_stop ;;
  show) show ;;
  *) echo "usage: $0 run|stop|show" >&2; exit 2 ;;
esac
