#!/usr/bin/env bash
# `make node-test`: the node scenario (e2e/scenarios/node_test.py) on a real kubelet node, as root:
# e2e/env/node.sh brings the node up (when it is not up already), e2e/env/build-image.sh builds the
# bpfpoly image offline under two tags and imports both into the node's containerd, then the
# chart is installed, exercised and uninstalled with the Helm SDK. A node this script started
# is taken down again at the end (`bash e2e/env/node.sh down`), whatever the result.
#
#   bash e2e/scenarios/node-test.sh                 all of it
#   bash e2e/scenarios/node-test.sh -k test_20      only some tests (unittest -k)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
log() { echo "[node-test] $*" >&2; }
die() { echo "[node-test] ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the node scenario runs a kubelet and loads eBPF programs: run it as root"
python3 -c 'import helm_python' 2>/dev/null || die "the helm-python-sdk wheel is missing: bash e2e/env/install-deps.sh (make deps)"
command -v bpftool >/dev/null || die "bpftool missing: bash e2e/env/install-deps.sh (make deps)"

export BPFPOLY_NODE_TAG1=node-a BPFPOLY_NODE_TAG2=node-b
export BPFPOLY_NODE_METRICS_PORT="${BPFPOLY_NODE_METRICS_PORT:-28464}"
export BPFPOLY_NODE_BPFFS="${BPFPOLY_NODE_BPFFS:-/sys/fs/bpf/bpfpoly-node}"
export KUBECONFIG="$REPO/.run/cluster/kubeconfig"

# make run's release is this scenario's release (bpfpoly in bpfpoly-system) on the same node.
if bash "$HERE/../env/run.sh" status >/dev/null 2>&1; then
    die "make run's stack is running (release bpfpoly in bpfpoly-system on node local): make stop first"
fi
started=0
bash "$HERE/../env/node.sh" status >/dev/null 2>&1 || started=1
# A control plane that is not running is started afresh: objects an earlier run left in etcd
# (make run's Node objects and samples, make chart-test's namespaces) are not this
# scenario's and would change what it counts.
if ! bash "$HERE/../env/cluster.sh" status >/dev/null 2>&1; then
    log "starting the local control plane afresh (cluster.sh down --purge)"
    bash "$HERE/../env/cluster.sh" down --purge >/dev/null 2>&1
fi
# shellcheck disable=SC2317  # invoked by the EXIT trap
finish() {
    local rc=$?
    if [[ $started -eq 1 ]]; then
        log "taking the node down (it was started here)"
        bash "$HERE/../env/node.sh" down >&2 || rc=1
    fi
    exit "$rc"
}
trap finish EXIT
t0=$SECONDS
bash "$HERE/../env/node.sh" up
bash "$HERE/../env/build-image.sh" --tag "$BPFPOLY_NODE_TAG1" --tag "$BPFPOLY_NODE_TAG2" --import >/dev/null
log "node and images ready ($((SECONDS - t0)) s); running e2e/scenarios/node_test.py"
python3 "$HERE/node_test.py" "$@"
log "node scenario passed ($((SECONDS - t0)) s in all)"
