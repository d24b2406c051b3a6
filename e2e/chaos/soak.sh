#!/usr/bin/env bash
# `make soak`: BPFPOLY_SOAK_CYCLES (default 100) apply/update/delete cycles of a program on
# an agent process of its own, on the real stack (`make run`), as root; then nothing of it
# may be left in the kernel or on bpffs (bpftool before/after) and the agent's RSS must be
# within +-10% of its RSS after warm-up. See e2e/chaos/soak_test.py. Starts the stack when it is
# not running (and stops it afterwards only in that case).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export KUBECONFIG="${KUBECONFIG:-$REPO/.run/cluster/kubeconfig}"
[ "$(id -u)" = 0 ] || { echo "the soak loads eBPF programs: run it as root" >&2; exit 1; }
mkdir -p "$REPO/.run/rel"
started=0
bash "$REPO/e2e/env/run.sh" status || started=1
bash "$REPO/e2e/env/run.sh" run >"$REPO/.run/rel/soak-run.log" 2>&1 || { tail -40 "$REPO/.run/rel/soak-run.log"; exit 1; }
# The agent under test is a copy: a rebuild of target/release while it runs changes nothing.
cp -f "$REPO/target/release/bpfpoly-agent" "$REPO/.run/rel/bpfpoly-agent"
echo "[bpfpoly] soak: ${BPFPOLY_SOAK_CYCLES:-100} cycles"
rc=0
python3 "$REPO/e2e/chaos/soak_test.py" || rc=$?
if [ $rc -ne 0 ]; then tail -20 "$REPO/.run/rel/agent-rel-soak.log" || true; fi
if [ $started = 1 ]; then bash "$REPO/e2e/env/run.sh" stop >/dev/null 2>&1 || true; fi
exit $rc
