#!/usr/bin/env bash
# The Prometheus half of issue 8, with the real tools, on the real stack (`make run`), as root:
#   1. `promtool check metrics` on the /metrics of both agents and the operator
#      (a parse error fails; lint findings are printed as warnings);
#   2. a real Prometheus on loopback scrapes them every second, labelled the way the chart's
#      PodMonitor labels them (job/component = agent|operator, node = the target's node);
#   3. e2e/scenarios/prometheus_test.py evaluates every query of the Grafana dashboard through the
#      Prometheus HTTP API and checks what must have data.
# Starts the stack when the operator is not running, and stops it afterwards only in that
# case. Prometheus itself (data in .run/prometheus/) is always stopped at the end.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUN="$REPO/.run"
PROM_DIR="$RUN/prometheus"
export KUBECONFIG="${KUBECONFIG:-$RUN/cluster/kubeconfig}"
say() { echo "[bpfpoly] prometheus: $*"; }
[ "$(id -u)" = 0 ] || { echo "the Prometheus checks need the stack, which loads eBPF programs: run as root" >&2; exit 1; }

# The endpoints of the `e2e/env/run.sh run` stack: the agent Pod of node local (host network),
# node debian-6-1 (Debian's 6.1 kernel in a microVM, e2e/kernels/vm.sh: its agent's /metrics
# through the VM's hostfwd on loopback), the leading operator Pod (its Pod IP, found below).
AGENT_LOCAL=127.0.0.1:${BPFPOLY_AGENT_METRICS_PORT:-9464}
AGENT_OLD=127.0.0.1:$((${BPFPOLY_VM_METRICS_BASE:-9470} + 1))

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  bash "$REPO/e2e/env/install-deps.sh"
fi

started=0
bash "$REPO/e2e/env/run.sh" status || started=1
prom_pid=
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [ -n "$prom_pid" ] && kill -0 "$prom_pid" 2>/dev/null; then
    kill -TERM "$prom_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$prom_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  rm -f "$PROM_DIR/prometheus.pid"
  if [ "$started" = 1 ]; then bash "$REPO/e2e/env/run.sh" stop >/dev/null 2>&1 || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ $started = 1 ]; then
  mkdir -p "$RUN"
  say "starting the stack (make run output in .run/prometheus-run.log)"
  bash "$REPO/e2e/env/run.sh" run >"$RUN/prometheus-run.log" 2>&1 || { tail -40 "$RUN/prometheus-run.log"; exit 1; }
fi
OPERATOR=$(bash "$REPO/e2e/env/run.sh" endpoints | awk '$1 == "operator" {sub("^http://", "", $2); sub("/metrics$", "", $2); print $2}')
[ -n "$OPERATOR" ] || { say "FAIL: no operator Pod holds the Lease"; exit 1; }
export BPFPOLY_OPERATOR_METRICS_ADDR=$OPERATOR

# 1. promtool on each endpoint's exposition. Exit codes: 0 clean, 3 lint findings, else error.
rc=0
for ep in "agent local=$AGENT_LOCAL" "agent debian-6-1=$AGENT_OLD" "operator=$OPERATOR"; do
  name=${ep%%=*} addr=${ep#*=}
  body=$(curl -fsS --max-time 5 "http://$addr/metrics") || { say "FAIL: $name http://$addr/metrics unreachable"; rc=1; continue; }
  [ -n "$body" ] || { say "FAIL: $name http://$addr/metrics is empty"; rc=1; continue; }
  lint_rc=0
  out=$(printf '%s\n' "$body" | promtool check metrics 2>&1) || lint_rc=$?
  case $lint_rc in
    0) say "promtool check metrics: $name ($(printf '%s\n' "$body" | grep -c '^bpfpoly_') bpfpoly_ samples) clean" ;;
    3) say "promtool check metrics: $name: lint warnings:"; printf '%s\n' "$out" | sed 's/^/    /' ;;
    *) say "FAIL: promtool check metrics: $name (exit $lint_rc):"; printf '%s\n' "$out" | sed 's/^/    /'; rc=1 ;;
  esac
done
[ $rc = 0 ] || exit $rc

# 2. Prometheus on a free loopback port (9090 unless taken).
port=${PROMETHEUS_PORT:-$(python3 - <<'EOF'
import socket
for p in range(9090, 9200):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
EOF
)}
[ -n "$port" ] || { say "no free port in 9090-9199"; exit 1; }
mkdir -p "$PROM_DIR"
rm -rf "$PROM_DIR/data"   # a fresh TSDB: no samples of a previous run within the lookback
# Labels as the chart's PodMonitor produces them: job = app.kubernetes.io/component (its
# jobLabel), `component` from the same pod label, `node` from the pod's node name, and for
# agents `instance` = the node name (no `pod`). The operator Pod runs on node `local` (with
# the PodMonitor: the node of its pod; its instance is its address, as here).
cat >"$PROM_DIR/prometheus.yml" <<EOF
# Written by e2e/env/prometheus.sh; scrapes the stack of e2e/env/run.sh (loopback and the leader's Pod IP).
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: agent
    metrics_path: /metrics
    static_configs:
      - targets: ['$AGENT_LOCAL']
        labels: {node: local, component: agent, instance: local}
      - targets: ['$AGENT_OLD']
        labels: {node: debian-6-1, component: agent, instance: debian-6-1}
  - job_name: operator
    metrics_path: /metrics
    static_configs:
      - targets: ['$OPERATOR']
        labels: {node: local, component: operator}
EOF
promtool check config "$PROM_DIR/prometheus.yml" >/dev/null

t0=$SECONDS
prometheus --config.file="$PROM_DIR/prometheus.yml" \
  --web.listen-address="127.0.0.1:$port" \
  --storage.tsdb.path="$PROM_DIR/data" --storage.tsdb.retention.time=1d \
  >"$PROM_DIR/prometheus.log" 2>&1 </dev/null &
prom_pid=$!
echo "$prom_pid" >"$PROM_DIR/prometheus.pid"
export PROMETHEUS_URL="http://127.0.0.1:$port"
until curl -fsS --max-time 2 "$PROMETHEUS_URL/-/ready" >/dev/null 2>&1; do
  if ! kill -0 "$prom_pid" 2>/dev/null || [ $((SECONDS - t0)) -ge 30 ]; then
    say "prometheus did not become ready:"; tail -20 "$PROM_DIR/prometheus.log"; exit 1
  fi
  sleep 0.2
done
say "prometheus $(prometheus --version 2>&1 | sed -n '1s/^prometheus, version \([^ ]*\).*/\1/p') ready at $PROMETHEUS_URL (pid $prom_pid, $((SECONDS - t0)) s; config and log in .run/prometheus/)"

# 3. The dashboard's queries against it.
test_rc=0
python3 "$REPO/e2e/scenarios/prometheus_test.py" || test_rc=$?
if [ $test_rc -ne 0 ]; then
  echo "--- .run/prometheus/prometheus.log (tail)"; tail -10 "$PROM_DIR/prometheus.log"
fi
exit $test_rc
