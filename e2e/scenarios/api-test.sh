#!/usr/bin/env bash
# Tests against the real kube-apiserver: the operator's `#[ignore]`d API tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${KUBECONFIG:?KUBECONFIG must point at a running API server (make cluster-up)}"
export KUBECONFIG
echo "[bpfpoly] API tests against $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
# The controller tests each start an operator, so they run one at a time.
cargo test -p bpfpoly-operator --test apiserver --test controller --test controller_lifecycle --test controller_liveness --test status_writes -- --ignored --test-threads=1
