#!/usr/bin/env bash
# `make bench`: bpfpoly side by side with its anchors, every anchor measured in the same run.
#
#   1. dispatch  BPF_PROG_TEST_RUN, same frames, same handler work: direct (floor), static,
#                tail call, libxdp's xdp-dispatcher.o, freplace (node-agent/examples/bench_dispatch/)
#   2. agent     the loader on the real kernel: assignment -> attached, verifier reject ->
#                fallback, load vs bpftool, start-up profile vs bpftool (examples/bench_agent/)
#   3. select    the selection engine with criterion (crds/benches/select.rs)
#   4. operator  500 .. 10000 SIMULATED nodes x 20 programs on a real kube-apiserver
#                (operator/examples/scale.rs), on a control plane private to this run, fresh
#                for every size; each size first times a floor client (one BpfNodeState per
#                node by server-side apply) on the same API server
#
# Writes target/bench/results.json (a list of {name, value, unit, anchor, anchor_value, ratio,
# target, met}), target/bench/results.md (the same as a Markdown table), one <section>.json
# each with the raw samples, and target/bench/jited/ (JIT'd and xlated dumps of the dispatch
# programs). Needs root (it loads eBPF programs and creates a veth pair).
#
# Time box: the whole run aims to finish within BPFPOLY_BENCH_DEADLINE seconds (default 2100,
# i.e. 35 min, builds included); the operator section runs last and gets what is left
# (at most BPFPOLY_BENCH_OPERATOR_BUDGET, default 1500 s; 10,000 nodes alone take about
# 4 min of it: setup, floor, operator). A size that cannot converge in the
# time left is stopped there and reported as not converged, with how far it got.
#
#   BPFPOLY_BENCH_SECTIONS="dispatch agent select operator"   which sections to run
#   BPFPOLY_BENCH_SIZES="500 1000 2500 5000 10000"            operator sizes (nodes)
#   BPFPOLY_BENCH_ETCD_PORT / _ETCD_PEER_PORT / _APISERVER_PORT  the private control plane
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
OUT="$TARGET/bench"
SECTIONS="${BPFPOLY_BENCH_SECTIONS:-dispatch agent select operator}"
SIZES="${BPFPOLY_BENCH_SIZES:-500 1000 2500 5000 10000}"
PROGRAMS=20
DEADLINE="${BPFPOLY_BENCH_DEADLINE:-2100}"
OPERATOR_BUDGET="${BPFPOLY_BENCH_OPERATOR_BUDGET:-1500}"
LIBXDP_DISPATCHER="${BPFPOLY_LIBXDP_DISPATCHER:-}"
# The private control plane: e2e/env/cluster.sh run from a directory of its own, so that this run
# neither disturbs nor is disturbed by `make run` or tests on the shared one (another operator
# would reconcile the simulated nodes too).
PRIVATE="$OUT/cluster"
export BPFPOLY_ETCD_PORT="${BPFPOLY_BENCH_ETCD_PORT:-23890}"
export BPFPOLY_ETCD_PEER_PORT="${BPFPOLY_BENCH_ETCD_PEER_PORT:-23900}"
export BPFPOLY_APISERVER_PORT="${BPFPOLY_BENCH_APISERVER_PORT:-16543}"

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] ERROR: $*" >&2; exit 1; }
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
elapsed() { echo $((SECONDS - T0)); }
T0=$SECONDS

# --- preconditions --------------------------------------------------------------------------

if has dispatch || has agent; then
    [[ $(id -u) -eq 0 ]] || die "the dispatch and agent sections load eBPF programs into the kernel and create a veth pair: run as root (sudo make bench), or BPFPOLY_BENCH_SECTIONS=\"select operator\""
    [[ -r /sys/kernel/btf/vmlinux ]] || die "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
fi

log "tools (apt: clang llvm libbpf-dev bpftool libxdp1 binutils iproute2)"
bash "$HERE/../env/install-deps.sh" --apt clang llvm libbpf-dev bpftool libxdp1 binutils iproute2 >&2
if [[ -z $LIBXDP_DISPATCHER ]]; then
    LIBXDP_DISPATCHER="$(dpkg -L libxdp1 2>/dev/null | grep -m1 '/xdp-dispatcher.o$' || true)"
fi
[[ -f $LIBXDP_DISPATCHER ]] || die "libxdp's xdp-dispatcher.o not found (dpkg -L libxdp1); set BPFPOLY_LIBXDP_DISPATCHER"

mkdir -p "$OUT"
# Only the sections run now are replaced; results.json gathers whatever sections are there.
for s in $SECTIONS; do rm -f "$OUT/$s.json"; done
has operator && rm -f "$OUT"/operator-*.json "$OUT"/apiserver-metrics-*.txt
rm -f "$OUT/results.json" "$OUT/results.md"

# --- cleanup on exit (only what this script started) ------------------------------------------

SCALE_PGID=""
PRIVATE_UP=0
cleanup() {
    if [[ -n $SCALE_PGID ]] && kill -0 "$SCALE_PGID" 2>/dev/null; then
        kill -TERM -- "-$SCALE_PGID" 2>/dev/null || true
    fi
    if [[ $PRIVATE_UP -eq 1 ]]; then
        bash "$PRIVATE/e2e/env/cluster.sh" down --purge >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# --- build ----------------------------------------------------------------------------------

cd "$REPO"
log "build: eBPF objects, release binaries and benchmark programs ($(elapsed) s)"
make -s -C ebpf
# The two bench-only builds of the classifier, with the ebpf Makefile's own flags (BUILD and
# VARIANT overridden on the command line; ebpf/build and the agent's built-ins are untouched):
#  direct  CLASSIFIER_ENTRY_HOOK parses and runs the handler body, then returns: the same
#          parse + handler work as every dispatch mechanism, without any dispatch
#  empty   CLASSIFIER_ENTRY_HOOK returns XDP_PASS at once: the cost of test_run's loop
DIRECT_HOOK='do { pkt = classifier_scratch_get(); if (!pkt || classifier_parse(data, data_end, CLASSIFIER_FRAME_LEN(ctx, data, data_end), vlan_aware, pkt) < 0) return CLASSIFIER_PASS; return classifier_account(pkt); } while (0)'
EMPTY_HOOK='return CLASSIFIER_PASS'
for v in direct empty; do
    hook=$DIRECT_HOOK
    [[ $v == empty ]] && hook=$EMPTY_HOOK
    mkdir -p "$OUT/ebpf-$v"
    make -s -B -C ebpf BUILD="$OUT/ebpf-$v" \
        "VARIANT=-DCLASSIFIER_XDP '-DCLASSIFIER_ENTRY_HOOK(ctx)=$hook'" \
        "$OUT/ebpf-$v/packet-classifier-xdp.o" >/dev/null
done
cargo build --release -q -p bpfpoly-agent --bins --examples
if has operator; then
    cargo build --release -q -p bpfpoly-operator --bins --examples
fi
if has select; then
    cargo bench -q -p bpfpoly-crds --bench select --no-run 2>/dev/null ||
        cargo bench -p bpfpoly-crds --bench select --no-run
fi
log "build done ($(elapsed) s)"

# --- 1. dispatch ----------------------------------------------------------------------------

if has dispatch; then
    log "1/4 dispatch overhead (BPF_PROG_TEST_RUN, 31 rounds x 1M repeats per program and frame, round-robin)"
    rm -rf "$OUT/jited"
    # BPF_ENABLE_STATS holders (an anon inode "bpf-stats"): every program run then pays two
    # clock reads, which inflates every dispatch figure by a constant.
    holders=""
    for fd_dir in /proc/[0-9]*/fd; do
        if find "$fd_dir" -maxdepth 1 -lname '*bpf-stats*' 2>/dev/null | grep -q .; then
            p="${fd_dir%/fd}"
            holders+="    ${p#/proc/} $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-120)"$'\n'
        fi
    done
    if [[ -n $holders || $(cat /proc/sys/kernel/bpf_stats_enabled 2>/dev/null) == 1 ]]; then
        log "WARNING: kernel BPF run-time statistics are ON (kernel.bpf_stats_enabled or BPF_ENABLE_STATS held by:"
        printf '%s' "$holders" >&2
        log "  ); every figure includes their cost and the ratios understate the dispatch overhead. Stop them (make stop) for a clean run."
    fi
    "$TARGET/release/examples/bench_dispatch" \
        --direct "$OUT/ebpf-direct/packet-classifier-xdp.o" \
        --empty "$OUT/ebpf-empty/packet-classifier-xdp.o" \
        --libxdp "$LIBXDP_DISPATCHER" \
        --runs 31 --repeat 1000000 \
        --jited-dir "$OUT/jited" >"$OUT/dispatch.json.tmp"
    mv "$OUT/dispatch.json.tmp" "$OUT/dispatch.json"
    log "dispatch done ($(elapsed) s)"
fi

# --- 2. agent -------------------------------------------------------------------------------

if has agent; then
    log "2/4 agent on the real kernel (100 updates paced + 100 back to back, 30 fallbacks, 30 loads, 10 profiles)"
    "$TARGET/release/examples/bench_agent" --agent "$TARGET/release/bpfpoly-agent" \
        --updates 100 --iterations 30 --objects "$OUT/objects" >"$OUT/agent.json.tmp"
    mv "$OUT/agent.json.tmp" "$OUT/agent.json"
    log "agent done ($(elapsed) s)"
fi

# --- 3. selection engine ----------------------------------------------------------------------

if has select; then
    log "3/4 selection engine (criterion)"
    cargo bench -q -p bpfpoly-crds --bench select -- --noplot >"$OUT/select.log" 2>&1 ||
        { tail -n 20 "$OUT/select.log" >&2; die "cargo bench -p bpfpoly-crds --bench select failed"; }
    BENCH_CRITERION_DIR="$TARGET/criterion/select" python3 "$HERE/bench_report.py" select "$OUT"
    log "select done ($(elapsed) s)"
fi

# --- 4. operator at scale ---------------------------------------------------------------------

# Counts node states that carry every program (progress of a run stopped by the time box).
converged_states() {
    timeout 90 kubectl get bpfnodestates -o json 2>/dev/null | python3 -c '
import json, sys
try:
    items = json.load(sys.stdin)["items"]
except Exception:
    print("?"); sys.exit(0)
print(sum(1 for s in items if len(s.get("spec", {}).get("programs", [])) == int(sys.argv[1])))
' "$PROGRAMS" || echo "?"
}

# CPU seconds (user + system) of a process; empty when it is gone.
cpu_seconds() {
    awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat" 2>/dev/null || true
}

# Runs `scale N PROGRAMS` for at most $2 seconds; writes $OUT/operator-N.json. Returns 3
# when the operator exited early.
# Samples the operator's peak RSS (VmHWM) and CPU time every second itself, so that a run
# stopped by the time box still reports them (as "so far" figures).
run_scale() {
    local n=$1 limit=$2 pidfile="$OUT/scale.pid" t0=$SECONDS status=0 gone=0
    rm -f "$OUT/scale-$n.hwm" "$OUT/scale-$n.cpu"
    local api_pid api_cpu0 op_pid op_cpu="" op_hwm=""
    rm -f "$pidfile"
    api_pid="$(cat "$PRIVATE/.run/cluster/kube-apiserver.pid")"
    api_cpu0="$(cpu_seconds "$api_pid")"
    # A process group of its own (the operator is scale's child), stopped as a whole. TMPDIR:
    # scale writes the operator's log to $TMPDIR/bpfpoly-scale-operator.log; keep it ours.
    mkdir -p "$OUT/tmp"
    # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
    TMPDIR="$OUT/tmp" setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" \
        "$TARGET/release/examples/scale" "$n" "$PROGRAMS" "$TARGET/release/bpfpoly-operator" \
        >"$OUT/scale-$n.out" 2>"$OUT/scale-$n.err" &
    local bg=$!
    for _ in $(seq 50); do [[ -s $pidfile ]] && break; sleep 0.1; done
    SCALE_PGID="$(cat "$pidfile")"
    while kill -0 "$bg" 2>/dev/null; do
        # Its result is printed before it cleans up; the cluster is thrown away instead.
        if grep -q '^{' "$OUT/scale-$n.out" 2>/dev/null; then
            kill -TERM -- "-$SCALE_PGID" 2>/dev/null || true
            break
        fi
        op_pid="$(pgrep -P "$SCALE_PGID" -f bpfpoly-operator | head -n 1 || true)"
        if [[ -n $op_pid ]]; then
            op_cpu="$(cpu_seconds "$op_pid")"
            op_hwm="$(awk '/^VmHWM:/ { print $2 }' "/proc/$op_pid/status" 2>/dev/null || true)"
            [[ -n $op_hwm ]] && echo "$op_hwm" >>"$OUT/scale-$n.hwm"
            [[ -n $op_cpu ]] && echo "$op_cpu" >"$OUT/scale-$n.cpu"
        fi
        # The operator (scale's child) must stay up until scale stops it (after convergence,
        # before it measures the node states and prints the result).
        if grep -q 'starting the operator' "$OUT/scale-$n.err" 2>/dev/null &&
            ! grep -q 'operator stopped' "$OUT/scale-$n.err" 2>/dev/null && [[ -z $op_pid ]]; then
            gone=$((gone + 1))
            if ((gone >= 3)); then
                log "  $n nodes: the operator exited early; its log:"
                tail -n 5 "$OUT/tmp/bpfpoly-scale-operator.log" >&2 || true
                kill -TERM -- "-$SCALE_PGID" 2>/dev/null || true
                wait "$bg" 2>/dev/null || true
                SCALE_PGID=""
                return 3
            fi
        else
            gone=0
        fi
        if ((SECONDS - t0 >= limit)); then
            log "  $n nodes: time box reached after $((SECONDS - t0)) s; counting progress, then stopping it"
            local done_n secs=$((SECONDS - t0))
            done_n="$(converged_states)"
            kill -TERM -- "-$SCALE_PGID" 2>/dev/null || true
            wait "$bg" 2>/dev/null || true
            kubectl get --raw /metrics >"$OUT/apiserver-metrics-$n.txt" 2>/dev/null || true
            python3 - "$n" "$PROGRAMS" "$secs" "$done_n" "$OUT/operator-$n.json" \
                "$(sort -n "$OUT/scale-$n.hwm" 2>/dev/null | tail -n 1)" "$op_cpu" \
                "$api_cpu0" "$(cpu_seconds "$api_pid")" <<'EOF'
import json, sys
n, progs, secs, done, path, hwm, op_cpu, api0, api1 = sys.argv[1:]
f = lambda x: float(x) if x else None
json.dump({"nodes": int(n), "programs": int(progs), "converged": False,
           "converge_seconds": None, "api_requests": None,
           "peak_rss_mib": None,
           "peak_rss_mib_so_far": round(int(hwm) / 1024, 1) if hwm else None,
           "operator_cpu_seconds_so_far": f(op_cpu),
           "apiserver_cpu_seconds": round(f(api1) - f(api0), 2) if api0 and api1 else None,
           "nodes_converged_at_stop": int(done) if done.isdigit() else None,
           "note": f"stopped by the time box after {secs} s (setup included): "
                   f"{done} of {n} node states carried all {progs} programs"},
          open(path, "w"))
EOF
            SCALE_PGID=""
            return 0
        fi
        sleep 1
    done
    wait "$bg" || status=$?
    SCALE_PGID=""
    grep -q '^{' "$OUT/scale-$n.out" 2>/dev/null && status=0
    if [[ $status -ne 0 ]] || ! [[ -s $OUT/scale-$n.out ]]; then
        tail -n 20 "$OUT/scale-$n.err" >&2
        die "scale $n $PROGRAMS failed (exit $status)"
    fi
    kubectl get --raw /metrics >"$OUT/apiserver-metrics-$n.txt" 2>/dev/null || true
    python3 - "$OUT/scale-$n.out" "$OUT/scale-$n.err" "$OUT/operator-$n.json" "$((SECONDS - t0))" \
        "$op_cpu" "$api_cpu0" "$(cpu_seconds "$api_pid")" <<'EOF'
import json, re, sys
out, err, path, wall, op_cpu, api0, api1 = sys.argv[1:]
r = json.loads(open(out).read().strip().splitlines()[-1])
m = re.search(r"not converged after (\d+) s: (\d+)/(\d+)", open(err).read())
r["converged"] = m is None
r["wall_seconds"] = int(wall)
r["operator_cpu_seconds"] = float(op_cpu) if op_cpu else None
r["apiserver_cpu_seconds"] = round(float(api1) - float(api0), 2) if api0 and api1 else None
if m:
    r["note"] = f"not converged within the scale example's own {m.group(1)} s cap: {m.group(2)} of {m.group(3)} node states complete"
json.dump(r, open(path, "w"))
EOF
    return 0
}

# A fresh private control plane (empty etcd) with the CRDs: one per size, which is much
# faster than deleting thousands of objects and leaves no history to the next size.
fresh_cluster() {
    bash "$PRIVATE/e2e/env/cluster.sh" down --purge >/dev/null 2>&1 || true
    PRIVATE_UP=1
    bash "$PRIVATE/e2e/env/cluster.sh" up >/dev/null
    kubectl apply -f "$REPO/crds/bpfpoly.io_crds.yaml" >/dev/null
    kubectl wait --for condition=established --timeout=60s \
        crd/bpfpolyprograms.bpfpoly.io crd/bpfnodestates.bpfpoly.io crd/bpfnodeprofiles.bpfpoly.io >/dev/null
}

if has operator; then
    log "4/4 operator at scale on a private control plane (SIMULATED nodes; $(elapsed) s so far)"
    mkdir -p "$PRIVATE/e2e/env"
    for f in cluster.sh install-deps.sh build-apiserver.sh build-kube.sh; do
        ln -sf "$HERE/../env/$f" "$PRIVATE/e2e/env/$f"
    done
    export KUBECONFIG="$PRIVATE/.run/cluster/kubeconfig"
    section_end=$((T0 + DEADLINE))
    ((SECONDS + OPERATOR_BUDGET < section_end)) && section_end=$((SECONDS + OPERATOR_BUDGET))
    for n in $SIZES; do
        left=$((section_end - SECONDS))
        if ((left < 45)); then
            log "  $n nodes: skipped, ${left} s left in the time box"
            python3 -c 'import json,sys; json.dump({"nodes": int(sys.argv[1]), "programs": int(sys.argv[2]), "converged": False, "converge_seconds": None, "peak_rss_mib": None, "api_requests": None, "note": "not run: the time box was used up by the smaller sizes"}, open(sys.argv[3], "w"))' "$n" "$PROGRAMS" "$OUT/operator-$n.json"
            continue
        fi
        log "  $n nodes x $PROGRAMS programs (up to ${left} s, fresh API server)"
        fresh_cluster
        rc=0
        run_scale "$n" "$((section_end - SECONDS))" || rc=$?
        if ((rc == 3)); then
            log "  $n nodes: once more, on a fresh API server"
            fresh_cluster
            rc=0
            run_scale "$n" "$((section_end - SECONDS))" || rc=$?
            ((rc == 3)) && die "scale $n $PROGRAMS: the operator exited early twice (log: $OUT/tmp/bpfpoly-scale-operator.log)"
        fi
        log "  -> $(cat "$OUT/operator-$n.json")"
    done
    python3 "$HERE/bench_report.py" operator "$OUT"
    bash "$PRIVATE/e2e/env/cluster.sh" down --purge >/dev/null 2>&1 || true
    PRIVATE_UP=0
    log "operator done ($(elapsed) s)"
fi

# --- report ---------------------------------------------------------------------------------

echo
echo "make bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, kernel $(uname -r), $(elapsed) s"
python3 "$HERE/bench_report.py" report "$OUT"
