#!/usr/bin/env bash
# `make e2e`: the end-to-end scenarios on the real stack (`make run`), as root.
# Starts the stack when it is not running, and stops it afterwards only in that case.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export KUBECONFIG="${KUBECONFIG:-$REPO/.run/cluster/kubeconfig}"
[ "$(id -u)" = 0 ] || { echo "e2e loads eBPF programs: run it as root" >&2; exit 1; }
started=0
mkdir -p "$REPO/.run"
bash "$REPO/e2e/env/run.sh" status || started=1
bash "$REPO/e2e/env/run.sh" run >"$REPO/.run/e2e-run.log" 2>&1 || { tail -40 "$REPO/.run/e2e-run.log"; exit 1; }
echo "[bpfpoly] e2e: stack up (make run output in .run/e2e-run.log)"
rc=0
python3 "$REPO/e2e/scenarios/e2e_test.py" || rc=$?
# The README's own-object recipe, as written.
[ $rc -ne 0 ] || python3 "$REPO/e2e/scenarios/own_object_test.py" || rc=$?
# __kconfig externs through a BpfPolyProgram: the values the program sees are the kernel's.
[ $rc -ne 0 ] || python3 "$REPO/e2e/scenarios/kconfig_object_test.py" || rc=$?
# Prometheus scrapes the stack; every dashboard query runs against it.
[ $rc -ne 0 ] || bash "$REPO/e2e/env/prometheus.sh" || rc=$?
if [ $rc -ne 0 ]; then
  # The Pods' logs (the leader's and the agent's), then the microVM's console.
  leader=$(kubectl get lease -n bpfpoly-system bpfpoly-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -z "$leader" ] || { echo "--- kubectl logs -n bpfpoly-system $leader (tail)"; kubectl logs -n bpfpoly-system "$leader" --tail 15 || true; }
  echo "--- kubectl logs -n bpfpoly-system ds/bpfpoly-agent (tail)"; kubectl logs -n bpfpoly-system ds/bpfpoly-agent --tail 15 || true
  echo "--- .run/kernels/6.1/console.log (tail)"; tail -15 "$REPO/.run/kernels/6.1/console.log" || true
fi
if [ $started = 1 ]; then bash "$REPO/e2e/env/run.sh" stop >/dev/null 2>&1 || true; fi
exit $rc
