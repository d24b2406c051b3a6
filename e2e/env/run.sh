#!/usr/bin/env bash
# `make run` / `make stop`: a local bpfpoly on this machine, installed the way a user installs it.
#
#   run:    install what is missing, build, start the full local cluster (what `make cluster-up`
#           starts: etcd, the API server, containerd, the CNI bridge, the kubelet of node
#           `local`, kube-proxy, controller-manager, scheduler), build the bpfpoly image offline
#           and import it, install the chart through the Helm SDK (the operator Deployment and
#           the agent DaemonSet run as Pods on node `local`), boot the real-kernel nodes, apply
#           the samples, wait until they settle, and show what was chosen where and why.
#   stop:   helm uninstall (its pre-delete hook unloads every program on every node), power the
#           microVMs off, take the node down (containers, bridge, iptables rules, mounts),
#           remove any pin left and the veths, stop the control plane; then check that none of
#           it is left (exit 1 naming what is).
#   status: exit 0 when the release is deployed and the node is up, 3 if not.
#   endpoints: the /metrics URLs: `agent-local URL`, `operator URL` (the leader), `operator-standby URL`.
#
# Node `local` is this machine, a real kubelet node. Each kernel in BPFPOLY_KERNELS (default
# "6.1"; any of e2e/kernels/kernels.list: "5.10 6.1 6.12 7.2") is a real Debian kernel booted in
# a qemu microVM (e2e/kernels/vm.sh) whose own bpfpoly-agent is node debian-<version>: an
# agent-only node (no kubelet; the chart's DaemonSet is kept off it), reaching the API server
# through the VM's guestfwd only.
#
# The agent Pod is on the host network, so its /metrics is at 127.0.0.1:BPFPOLY_AGENT_METRICS_PORT
# (9464). The operators' /metrics are at their Pod IPs on the node's bridge, port 9465; the
# leader is the holder of the Lease bpfpoly-system/bpfpoly-operator.
#
# Ports and names (override for parallel runs): BPFPOLY_AGENT_METRICS_PORT (9464),
# BPFPOLY_VM_METRICS_BASE (9470: the microVMs' agents), BPFPOLY_BPFFS_ROOT (/sys/fs/bpf/bpfpoly),
# BPFPOLY_VETH_PREFIX (bpfpoly: this machine's veth pairs PREFIX0/1 and PREFIX2/3; the samples
# name bpfpoly0-3, aliased when the prefix differs), cluster.sh's BPFPOLY_ETCD_PORT,
# BPFPOLY_ETCD_PEER_PORT, BPFPOLY_APISERVER_PORT, node.sh's BPFPOLY_NODE_BRIDGE, BPFPOLY_POD_NET.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUN="$REPO/.run"
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release"
KERNELS="${BPFPOLY_KERNELS-6.1}"
AGENT_PORT="${BPFPOLY_AGENT_METRICS_PORT:-9464}"
OPERATOR_PORT=9465
BPFFS_ROOT="${BPFPOLY_BPFFS_ROOT:-/sys/fs/bpf/bpfpoly}"
VETH="${BPFPOLY_VETH_PREFIX:-bpfpoly}"
VM="$REPO/e2e/kernels/vm.sh"
NS=bpfpoly-system
RELEASE=bpfpoly
LEASE=bpfpoly-operator
IMAGE_TAG="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO/charts/bpfpoly/Chart.yaml")"
export KUBECONFIG="${KUBECONFIG:-$RUN/cluster/kubeconfig}"
say() { echo "[bpfpoly] $*"; }

veth() { # a b
  ip link show "$1" >/dev/null 2>&1 || ip link add "$1" type veth peer name "$2"
  ip link set "$1" up; ip link set "$2" up
}

# ConfigMaps with bytecode are read from this namespace only (the release namespace).
BYTECODE_NS=$NS
EXTRA_ARGS=()
if [ "$VETH" != bpfpoly ]; then
  for i in 0 1 2 3; do EXTRA_ARGS+=("--interface-alias=bpfpoly$i=$VETH$i"); done
fi

api_up() { [ -s "$KUBECONFIG" ] && kubectl get --raw /readyz >/dev/null 2>&1; }
leader() { kubectl get lease -n "$NS" "$LEASE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true; }
pod_ip() { kubectl get pod -n "$NS" "$1" -o jsonpath='{.status.podIP}' 2>/dev/null || true; }
operator_pods() {
  kubectl get pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator" \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' 2>/dev/null || true
}

# The chart's values for this run (JSON for the Helm SDK).
values_json() { # image-id
  python3 -c '
import json, sys
image_id, port, root, ns, bytecode, *extra = sys.argv[1:]
# A rebuilt image under the same tag rolls the Pods: the annotation changes with it.
ann = {"bpfpoly.io/image-id": image_id}
print(json.dumps({
    "operator": {"podAnnotations": ann},
    "agent": {
        "metricsPort": int(port),
        "bpffsRoot": root,
        "configMapNamespaces": [ns],
        # bytecode.path objects come from .run/bytecode of this checkout (not /var/lib/bpfpoly,
        # which the hostPath of the chart would create on this machine).
        "allowedBytecodeDirs": [bytecode],
        "extraArgs": extra,
        "podAnnotations": ann,
        # The microVM nodes run their own agent and no kubelet: no agent Pod is put there
        # (the chart tolerates every taint by default, their NoSchedule taint included).
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "bpfpoly.io/microvm", "operator": "DoesNotExist"}]}]}}},
    },
}))' "$1" "$AGENT_PORT" "$BPFFS_ROOT" "$BYTECODE_NS" "$RUN/bytecode" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
}

# The Deployment and the DaemonSet rolled out, every Pod Ready, a leader holding the Lease.
pods_ready() {
  kubectl rollout status -n "$NS" "ds/$RELEASE-agent" --timeout=2s >/dev/null 2>&1 \
    && kubectl rollout status -n "$NS" "deploy/$RELEASE-operator" --timeout=2s >/dev/null 2>&1 \
    && [ -z "$(kubectl get pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE" \
          -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
          | grep -v '=True$')" ] \
    && operator_pods | grep -qx "$(leader)"
}

pod_problems() { # what is wrong with the release's Pods, with Events and logs
  kubectl get pods -n "$NS" -o wide || true
  local p
  for p in $(kubectl get pods -n "$NS" -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    echo "--- Pod $NS/$p"
    kubectl get events -n "$NS" --field-selector "involvedObject.name=$p" 2>/dev/null | tail -n 8 || true
    kubectl logs -n "$NS" "$p" --all-containers --tail 20 2>&1 || true
  done
}

cmd_run() {
  [ "$(id -u)" = 0 ] || { echo "make run runs a kubelet and loads eBPF programs: run it as root" >&2; exit 1; }
  local t0=$SECONDS
  mkdir -p "$RUN"
  say "1/6 installing what is missing"
  bash "$REPO/e2e/env/install-deps.sh"
  say "2/6 building (eBPF objects and release binaries; a cold build takes a few minutes)"
  make -s -C "$REPO" ebpf
  # Cargo's own progress (crate counts), not -q: a cold build takes several minutes.
  (cd "$REPO" && cargo build --release -p bpfpoly-operator -p bpfpoly-agent 2>&1 \
     | sed -u -n -e 's/^ *Compiling \([^ ]*\) .*/[bpfpoly]   compiling \1/p' -e 's/^ *Finished .*/[bpfpoly]   &/p')
  say "3/6 starting the local cluster (API server, containerd, CNI bridge, kubelet, kube-proxy, controller-manager, scheduler)"
  bash "$REPO/e2e/env/node.sh" up 2>&1 | sed -u 's/^/[bpfpoly]   /' # cluster.sh up first
  local archive="$RUN/images/bpfpoly-$IMAGE_TAG.tar" image_id
  bash "$REPO/e2e/env/build-image.sh" --tag "$IMAGE_TAG" --import 2>&1 >/dev/null | sed -u 's/^/[bpfpoly]   /'
  image_id="$(sha256sum "$archive" | cut -c1-16)"
  say "   image bpfpoly/bpfpoly:$IMAGE_TAG ($(du -m "$archive" | cut -f1) MiB archive, id $image_id) imported into the node's containerd"
  say "4/6 CRDs, node labels, veth pairs; booting the real-kernel nodes (${KERNELS:-none})"
  # The chart installs its CRDs on first install only; applied here, an edited CRD takes effect.
  kubectl apply -f "$REPO/crds/bpfpoly.io_crds.yaml" >/dev/null
  kubectl wait --for condition=established --timeout=30s crd/bpfpolyprograms.bpfpoly.io >/dev/null
  kubectl label node local bpfpoly.io/host=this-machine --overwrite >/dev/null
  veth "${VETH}0" "${VETH}1"; veth "${VETH}2" "${VETH}3"
  # microVM nodes of an earlier run that this one does not boot: their Node objects go
  # (a rollout would wait for them forever).
  local keep=" " n
  for k in $KERNELS; do keep+="$(bash "$VM" node-name "$k") "; done
  for n in $(kubectl get nodes -l bpfpoly.io/microvm=true -o jsonpath='{.items[*].metadata.name}'); do
    case "$keep" in *" $n "*) ;; *) kubectl delete node "$n" --wait=false >/dev/null; say "deleted node $n (its microVM is not part of this run)" ;; esac
  done
  # Nodes of earlier versions of make run that nothing answers for any more (the second
  # agent on this host; simulated nodes of a chaos run) would hold a rollout back.
  for n in $(kubectl get nodes -l bpfpoly.io/second-agent-on-same-host=true -o jsonpath='{.items[*].metadata.name}'); do
    kubectl delete node "$n" --wait=false >/dev/null; say "deleted node $n (the retired second agent on this host)"
  done
  # shellcheck disable=SC2086 # a list of kernels
  [ -z "$KERNELS" ] || BPFPOLY_CONFIGMAP_NAMESPACES="$BYTECODE_NS" bash "$VM" start $KERNELS
  say "5/6 installing the chart (Helm SDK): the operator Deployment and the agent DaemonSet"
  python3 "$REPO/e2e/env/helm-release.py" apply "$RELEASE" "$NS" "$(values_json "$image_id")" | sed 's/^/[bpfpoly]   /'
  local deadline=$((SECONDS + 180))
  until pods_ready; do
    if [ $SECONDS -ge $deadline ]; then
      say "the release's Pods are not Ready after 180 s:"; pod_problems; exit 1
    fi
    sleep 1
  done
  say "   Pods Ready (leader $(leader))"
  # shellcheck disable=SC2086
  [ -z "$KERNELS" ] || bash "$VM" wait $KERNELS
  say "6/6 applying the samples in crds/examples/ and waiting for them to settle"
  kubectl apply -f "$REPO/crds/examples/" >/dev/null
  deadline=$((SECONDS + 180))
  local not_ready
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
  say "make run: up in $((SECONDS - t0)) s"
}

cmd_endpoints() {
  local l p
  echo "agent-local http://127.0.0.1:$AGENT_PORT/metrics"
  l="$(leader)"
  for p in $(operator_pods); do
    if [ "$p" = "$l" ]; then echo "operator http://$(pod_ip "$p"):$OPERATOR_PORT/metrics"
    else echo "operator-standby http://$(pod_ip "$p"):$OPERATOR_PORT/metrics"; fi
  done
}

show() {
  echo
  kubectl get pods -n "$NS" -o wide
  echo
  kubectl get nodes -L bpfpoly.io/kernel
  echo
  kubectl get bpp,bns,bnp
  for p in $(kubectl get bpp -o jsonpath='{.items[*].metadata.name}'); do
    echo
    "$BIN/bpfpoly-operator" explain "$p" --kubeconfig "$KUBECONFIG"
  done
  local l
  l="$(leader)"
  cat <<EOF

Pods:      kubectl get pods -n $NS -o wide    (operator leader: $l)
Metrics:   agent local http://127.0.0.1:$AGENT_PORT/metrics (host network) · operator (leader) http://$(pod_ip "$l"):$OPERATOR_PORT/metrics
$(for k in $KERNELS; do echo "           agent $(bash "$VM" node-name "$k") (Debian $k, microVM) http://127.0.0.1:$(bash "$VM" metrics-port "$k")/metrics"; done)
Logs:      kubectl logs -n $NS ds/$RELEASE-agent · kubectl logs -n $NS $l$(for k in $KERNELS; do printf ' · .run/kernels/%s/console.log' "$k"; done)
kubectl:   export KUBECONFIG=$KUBECONFIG
           kubectl get bpp,bns,bnp; kubectl get events -n default
Explain:   ${BIN#"$REPO"/}/bpfpoly-operator explain exec-tracer
Stop:      make stop
EOF
}

# What `stop` must not leave behind; prints each thing left, returns 1 if any.
leftovers() {
  local left=0 what
  what="$(ls -A "$RUN/node/containerd" 2>/dev/null || true)"
  [ -z "$what" ] || { say "LEFT: containerd state under .run/node/containerd"; left=1; }
  what="$(pgrep -a -f "containerd-shim-runc-v2 .*$RUN/node/" || true)"
  [ -z "$what" ] || { say "LEFT: container shims: $what"; left=1; }
  for c in kubelet kube-proxy kube-controller-manager kube-scheduler containerd api-relay; do
    if [ -s "$RUN/node/$c.pid" ] && kill -0 "$(cat "$RUN/node/$c.pid")" 2>/dev/null; then say "LEFT: $c running"; left=1; fi
  done
  what="$(pgrep -a -f "qemu-system-x86_64 .*$RUN/kernels/" || true)"
  [ -z "$what" ] || { say "LEFT: qemu: $what"; left=1; }
  # The kernel programs node local's agent reported before the uninstall.
  what="$(for id in $(cat "$RUN/stop-program-ids" 2>/dev/null); do bpftool prog show id "$id" >/dev/null 2>&1 && echo "$id"; done)"
  [ -z "$what" ] || { say "LEFT: kernel programs $(echo "$what" | tr '\n' ' ')"; left=1; }
  if [ -d "$BPFFS_ROOT" ]; then say "LEFT: $BPFFS_ROOT"; left=1; fi
  what="$(for t in filter nat mangle; do iptables -w -t $t -S 2>/dev/null | grep -E '^-N (KUBE|CNI)-' | sed "s/^/$t /"; done)"
  [ -z "$what" ] || { say "LEFT: iptables chains: $(echo "$what" | tr '\n' ' ')"; left=1; }
  for l in "${BPFPOLY_NODE_BRIDGE:-bpncni0}" "${VETH}0" "${VETH}2"; do
    if ip link show "$l" >/dev/null 2>&1; then say "LEFT: interface $l"; left=1; fi
  done
  return $left
}

cmd_stop() {
  local rc=0
  if api_up; then
    kubectl get bns local -o jsonpath='{range .status.programs[*]}{.programIds}{"\n"}{end}' 2>/dev/null \
      | tr -d '[]' | tr ',' '\n' | grep -E '^[0-9]+$' >"$RUN/stop-program-ids" || true
    if kubectl get ns "$NS" >/dev/null 2>&1; then
      # The pre-delete hook deletes every BpfPolyProgram and waits until each is unloaded
      # from every node (the microVMs' too), before the operator and the agents go.
      local t_un=$SECONDS
      python3 "$REPO/e2e/env/helm-release.py" uninstall "$RELEASE" "$NS" | sed 's/^/[bpfpoly] /' || rc=1
      say "   helm uninstall: $((SECONDS - t_un)) s"
      # Deleted Pods are gone once their kubelet confirms: before the node goes down.
      local deadline=$((SECONDS + 90))
      while [ -n "$(kubectl get pods -n "$NS" -o name 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
      if [ -n "$(kubectl get pods -n "$NS" -o name 2>/dev/null)" ]; then
        say "LEFT: Pods in $NS after 90 s: $(kubectl get pods -n "$NS" -o name | tr '\n' ' ')"; rc=1
      else
        say "no Pods left in $NS ($((SECONDS - t_un)) s after the uninstall began)"
      fi
    fi
  fi
  # Every microVM this checkout started (their programs go with their kernels).
  bash "$VM" stop
  bash "$REPO/e2e/env/node.sh" down
  # After a failed uninstall, programs stay pinned: removed here, the root with them.
  if [ -d "$BPFFS_ROOT" ]; then
    if [ -x "$BIN/bpfpoly-agent" ]; then
      say "removing what is still pinned under $BPFFS_ROOT"
      "$BIN/bpfpoly-agent" cleanup --bpffs-root "$BPFFS_ROOT" || true
    fi
  fi
  for l in "${VETH}0" "${VETH}2"; do ip link del "$l" 2>/dev/null || true; done
  bash "$REPO/e2e/env/cluster.sh" down
  if leftovers; then
    say "stopped: no containers, Pods, programs ($(cat "$RUN/stop-program-ids" 2>/dev/null | wc -l) checked), pins, iptables chains, bridge, veths or qemu left"
  else
    rc=1
  fi
  rm -f "$RUN/stop-program-ids"
  return $rc
}

cmd_status() {
  api_up || return 3
  bash "$REPO/e2e/env/node.sh" status >/dev/null 2>&1 || return 3
  python3 "$REPO/e2e/env/helm-release.py" status "$RELEASE" "$NS" >/dev/null 2>&1 || return 3
}

case "${1:-}" in
  run) cmd_run ;;
  stop) cmd_stop ;;
  show) show ;;
  status) cmd_status ;;
  endpoints) cmd_endpoints ;;
  *) echo "usage: $0 run|stop|show|status|endpoints" >&2; exit 2 ;;
esac
