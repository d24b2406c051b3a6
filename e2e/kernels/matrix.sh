#!/usr/bin/env bash
# `make kernels`: the kernel matrix (part of `make test`). Starts the stack of `make run` with
# every Debian kernel of e2e/kernels/kernels.list as a real-kernel node (qemu microVMs) plus
# this host, runs the verifier matrix (verify_matrix.py) and matrix_test.py (exact per-kernel expectations; writes
# target/kernels/matrix.json), and stops what it started. Root, qemu and BPF are required:
# without them it fails with the reason (BPFPOLY_SKIP_PRIVILEGED=1 skips it, saying so).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export KUBECONFIG="${KUBECONFIG:-$REPO/.run/cluster/kubeconfig}"
export BPFPOLY_KERNELS="${BPFPOLY_KERNELS:-$(awk '!/^#/ && NF {printf "%s ", $1}' "$REPO/e2e/kernels/kernels.list")}"
if [ "${BPFPOLY_SKIP_PRIVILEGED:-}" = 1 ]; then
  echo "[bpfpoly] kernels: SKIPPED (BPFPOLY_SKIP_PRIVILEGED=1): the matrix needs root, BPF and qemu"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "[bpfpoly] kernels: the matrix loads eBPF programs and boots microVMs: run it as root" >&2; exit 1; }
if bash "$REPO/e2e/env/run.sh" status; then
  echo "[bpfpoly] kernels: a \`make run\` stack is running; \`make stop\` first (the matrix starts its own with every kernel)" >&2
  exit 1
fi
mkdir -p "$REPO/.run"
T0=$SECONDS
# The kernels first (cached), then the offline explain on each kernel's BTF, required here.
# shellcheck disable=SC2086 # a list of kernels
bash "$REPO/e2e/kernels/fetch.sh" $BPFPOLY_KERNELS
echo "[bpfpoly] kernels: explain offline on each kernel's BTF (BPFPOLY_REQUIRE_KERNELS=1)"
(cd "$REPO" && BPFPOLY_REQUIRE_KERNELS=1 cargo test -q -p bpfpoly-operator --test explain_offline 2>&1 | tail -n 3) \
  || { echo "[bpfpoly] kernels: explain_offline failed" >&2; exit 1; }
# The release agent the verifier matrix and the microVMs run (a no-op after `make e2e`).
echo "[bpfpoly] kernels: cargo build --release (the agent and operator the matrix runs)"
(cd "$REPO" && cargo build -q --release -p bpfpoly-agent -p bpfpoly-operator) \
  || { echo "[bpfpoly] kernels: cargo build --release failed" >&2; exit 1; }
# The verifier matrix: bpfpoly-agent verify against bpftool prog loadall on every kernel and
# this host, program by program (no cluster; the guests boot without a network).
# shellcheck disable=SC2086 # a list of kernels
python3 "$REPO/e2e/kernels/verify_matrix.py" $BPFPOLY_KERNELS \
  || { echo "[bpfpoly] kernels: the verifier matrix failed" >&2; exit 1; }
echo "[bpfpoly] kernels: starting the stack with kernels: $BPFPOLY_KERNELS (log .run/matrix-run.log)"
set +e +o pipefail
bash "$REPO/e2e/env/run.sh" run 2>&1 | tee "$REPO/.run/matrix-run.log" | grep --line-buffered -E '^\[bpfpoly\] (vm|kernels|[0-9]/6)'
run_rc=${PIPESTATUS[0]}
set -e -o pipefail
if [ "$run_rc" -ne 0 ] || ! grep -q '^Stop:' "$REPO/.run/matrix-run.log"; then
  tail -40 "$REPO/.run/matrix-run.log"
  rc=1
else
  rc=0
  echo "[bpfpoly] kernels: stack up in $((SECONDS - T0)) s"
  python3 "$REPO/e2e/kernels/matrix_test.py" || rc=$?
fi
if [ $rc -ne 0 ]; then
  for k in $BPFPOLY_KERNELS; do echo "--- .run/kernels/$k/console.log (tail)"; tail -12 "$REPO/.run/kernels/$k/console.log" 2>/dev/null || true; done
  leader=$(kubectl get lease -n bpfpoly-system bpfpoly-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ -z "$leader" ] || { echo "--- kubectl logs -n bpfpoly-system $leader (tail)"; kubectl logs -n bpfpoly-system "$leader" --tail 12 2>/dev/null || true; }
fi
bash "$REPO/e2e/env/run.sh" stop >"$REPO/.run/matrix-stop.log" 2>&1 || { cat "$REPO/.run/matrix-stop.log"; rc=1; }
if pgrep -f "qemu-system-x86_64 .*$REPO/.run/kernels/" >/dev/null; then
  echo "[bpfpoly] kernels: qemu processes left behind after stop:" >&2
  pgrep -af "qemu-system-x86_64 .*$REPO/.run/kernels/" >&2
  rc=1
fi
echo "[bpfpoly] kernels: matrix $([ $rc -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - T0)) s"
exit $rc
