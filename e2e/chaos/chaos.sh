#!/usr/bin/env bash
# `make chaos`: faults on the real stack (`make run`), as root. Starts the stack when it is
# not running (and stops it afterwards only in that case), like e2e/scenarios/e2e.sh.
#
#   1. hostile bytecode through a real agent process of its own
#      (node-agent/tests/hostile_agent.rs)
#   2. e2e/chaos/chaos_test.py: SIGKILL its own agent during load and update, operator restart
#      mid-rollout, API server down, etcd restart (see the file for what is asserted)
#
# The agents under test are this script's own processes (nodes rel-hostile and rel-node,
# bpffs roots /sys/fs/bpf/bpfpoly-rel*, veths brel*): the shared agents are never killed.
# Steps 2-4 of chaos_test.py stop the shared operator, API server and etcd for a while;
# BPFPOLY_CHAOS_CONTROL_PLANE=0 skips them on a stack other people are using.
#
# Knobs: BPFPOLY_CHAOS_KILLS (20), BPFPOLY_CHAOS_APISERVER_DOWN (60 s),
#        BPFPOLY_CHAOS_ETCD_DOWN (10 s), BPFPOLY_CHAOS_CONTROL_PLANE (1),
#        BPFPOLY_CHAOS_HOSTILE (1: run step 1).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export KUBECONFIG="${KUBECONFIG:-$REPO/.run/cluster/kubeconfig}"
[ "$(id -u)" = 0 ] || { echo "chaos loads eBPF programs and kills processes: run it as root" >&2; exit 1; }
say() { echo "[bpfpoly] chaos: $*"; }
mkdir -p "$REPO/.run/rel"
started=0
bash "$REPO/e2e/env/run.sh" status || started=1
bash "$REPO/e2e/env/run.sh" run >"$REPO/.run/rel/chaos-run.log" 2>&1 || { tail -40 "$REPO/.run/rel/chaos-run.log"; exit 1; }
say "stack up"
# The agent under test is a copy: a rebuild of target/release while it runs changes nothing.
cp -f "$REPO/target/release/bpfpoly-agent" "$REPO/.run/rel/bpfpoly-agent"
rc=0
t0=$SECONDS
if [ "${BPFPOLY_CHAOS_HOSTILE:-1}" = 1 ]; then
  say "hostile bytecode through the agent"
  (cd "$REPO" && cargo test -q -p bpfpoly-agent --test hostile_agent -- --ignored --nocapture 2>&1) \
    | grep -vE '^(running|$)' || rc=1
fi
say "SIGKILL, operator restart, API server and etcd outages"
python3 "$REPO/e2e/chaos/chaos_test.py" || rc=1
if [ $rc -ne 0 ]; then
  for p in $(kubectl get pods -n bpfpoly-system -o name 2>/dev/null); do
    echo "--- kubectl logs -n bpfpoly-system $p (tail)"; kubectl logs -n bpfpoly-system "$p" --tail 15 || true
  done
  [ -f "$REPO/.run/rel/agent-rel-node.log" ] && { echo "--- .run/rel/agent-rel-node.log (tail)"; tail -15 "$REPO/.run/rel/agent-rel-node.log"; }
fi
say "done in $((SECONDS - t0)) s (report: target/chaos-report.json)"
if [ $started = 1 ]; then bash "$REPO/e2e/env/run.sh" stop >/dev/null 2>&1 || true; fi
exit $rc
