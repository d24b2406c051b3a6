#!/usr/bin/env bash
# `make run` / `make stop`: a local bpfpoly on this machine.
#
#   run:  install what is missing, build, start the local control plane, the operator and two
#         agents, apply the samples, wait until they settle, and show what was chosen where.
#   stop: stop what `run` started (by PID), unload the programs, remove the veths, stop the
#         control plane.
#
# Node `local` is this machine. Node `old-kernel` is a SECOND AGENT ON THE SAME HOST that
# answers from Debian's 6.1 kernel BTF (--btf-path) and keeps its pins in its own bpffs root;
# it loads into this host's kernel, on its own veth pairs, so one run shows two kernels
# choosing differently.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN="$REPO/.run"
BIN="$REPO/target/release"
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
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
OLD_BTF="$CACHE/btf/debian-6.1-cloud.btf"
OLD_RELEASE_FILE="$CACHE/btf/debian-6.1-cloud.release"
ALIASES=(--interface-alias bpfpoly0=bpfold0 --interface-alias bpfpoly1=bpfold1
         --interface-alias bpfpoly2=bpfold2 --interface-alias bpfpoly3=bpfold3)

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
  say "4/6 nodes and veth pairs"
  kubectl apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: local
  labels: {bpfpoly.io/host: this-machine}
---
apiVersion: v1
kind: Node
metadata:
  name: old-kernel
  labels: {bpfpoly.io/host: this-machine, bpfpoly.io/second-agent-on-same-host: "true"}
  annotations: {bpfpoly.io/note: "second agent on this host, answering from Debian 6.1 BTF"}
EOF
  veth bpfpoly0 bpfpoly1; veth bpfpoly2 bpfpoly3
  veth bpfold0 bpfold1; veth bpfold2 bpfold3
  say "5/6 starting the operator and the agents"
  start_bg operator "$RUN/operator.pid" "$RUN/operator.log" \
    "$BIN/bpfpoly-operator" run --kubeconfig "$KUBECONFIG" --metrics-addr 127.0.0.1:9465
  start_bg "agent local" "$RUN/agent-local.pid" "$RUN/agent-local.log" \
    "$BIN/bpfpoly-agent" run --node-name local --kubeconfig "$KUBECONFIG" \
    --bpffs-root /sys/fs/bpf/bpfpoly --metrics-addr 127.0.0.1:9464 \
    --allowed-bytecode-dirs "$RUN/bytecode" --configmap-namespaces "$BYTECODE_NS"
  start_bg "agent old-kernel (second agent, same host)" "$RUN/agent-old-kernel.pid" "$RUN/agent-old-kernel.log" \
    "$BIN/bpfpoly-agent" run --node-name old-kernel --kubeconfig "$KUBECONFIG" \
    --btf-path "$OLD_BTF" --kernel-release "$(cat "$OLD_RELEASE_FILE")" \
    --bpffs-root /sys/fs/bpf/bpfpoly-old-kernel --metrics-addr 127.0.0.1:9466 \
    --allowed-bytecode-dirs "$RUN/bytecode" --configmap-namespaces "$BYTECODE_NS" "${ALIASES[@]}"
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

Metrics:   agent local http://127.0.0.1:9464/metrics · agent old-kernel http://127.0.0.1:9466/metrics
           operator    http://127.0.0.1:9465/metrics
Logs:      .run/operator.log, .run/agent-local.log, .run/agent-old-kernel.log
kubectl:   export KUBECONFIG=$KUBECONFIG
           kubectl get bpp,bns,bnp; kubectl get events -n default
Explain:   target/release/bpfpoly-operator explain exec-tracer
Stop:      make stop
EOF
}

cmd_stop() {
  stop_pid operator "$RUN/operator.pid"
  stop_pid "agent local" "$RUN/agent-local.pid"
  stop_pid "agent old-kernel" "$RUN/agent-old-kernel.pid"
  # SIGTERM leaves programs running by design; stop removes them, and the roots with them.
  for root in /sys/fs/bpf/bpfpoly /sys/fs/bpf/bpfpoly-old-kernel; do
    if [ -x "$BIN/bpfpoly-agent" ] && [ -d "$root" ]; then
      "$BIN/bpfpoly-agent" cleanup --bpffs-root "$root" || true
    fi
    if [ -d "$root" ]; then say "WARNING: $root is still there"; fi
  done
  for l in bpfpoly0 bpfpoly2 bpfold0 bpfold2; do ip link del "$l" 2>/dev/null || true; done
  bash "$REPO/e2e/cluster.sh" down
}

case "${1:-}" in
  run) cmd_run ;;
  stop) cmd_stop ;;
  show) show ;;
  *) echo "usage: $0 run|stop|show" >&2; exit 2 ;;
esac
