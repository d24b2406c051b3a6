#!/usr/bin/env bash
# `make chart-test`: the Helm chart (charts/bpfpoly) tested with Helm v4 through the
# helm-python-sdk wheel (no helm binary) and the local Kubernetes 1.20 API server: lint,
# renders asserted field by field, schema, dashboard, install/upgrade/uninstall, RBAC with
# `kubectl auth can-i`. See e2e/scenarios/chart_test.py.
#
#   bash e2e/scenarios/chart-test.sh                 all tests
#   bash e2e/scenarios/chart-test.sh -k Render       only tests whose name contains "Render"
#
# Uses $KUBECONFIG when set; otherwise the local control plane (.run/cluster/kubeconfig),
# started with `bash e2e/env/cluster.sh up` when it is not running.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

log() { echo "[chart-test] $*" >&2; }
die() { echo "[chart-test] ERROR: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 not found (bash e2e/env/install-deps.sh installs it)"
command -v kubectl >/dev/null 2>&1 || die "kubectl not found (bash e2e/env/install-deps.sh installs it)"
python3 -c 'import helm_python, yaml' 2>/dev/null \
    || die "the helm-python-sdk and pyyaml wheels are missing: run bash e2e/env/install-deps.sh (make deps)"

if [[ -z ${KUBECONFIG:-} ]]; then
    if ! bash "$HERE/../env/cluster.sh" status >/dev/null 2>&1; then
        log "local API server not running: starting it"
        bash "$HERE/../env/cluster.sh" up >/dev/null
    fi
    KUBECONFIG="$REPO/.run/cluster/kubeconfig"
fi
export KUBECONFIG
[[ -s $KUBECONFIG ]] || die "KUBECONFIG=$KUBECONFIG does not exist"
kubectl get --raw /readyz >/dev/null 2>&1 || die "the API server of $KUBECONFIG is not ready"
log "API server $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"

exec python3 "$HERE/chart_test.py" "$@"
