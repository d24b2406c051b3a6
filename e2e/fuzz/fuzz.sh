#!/usr/bin/env bash
# `make fuzz`: time-bounded fuzzing on stable Rust (proptest strategies and seeded,
# structure-aware mutators; no nightly, no cargo-fuzz), optimized builds.
#
#   crds/tests/fuzz_crds.rs          CR validation (text and tree mutations of every sample),
#                                    kernel release/requirement, query and config parsing
#   node-agent/tests/fuzz_objects.rs object inspection + the loader's object check (seeds:
#                                    built-ins, ebpf/build/*.o, Debian libxdp1's objects),
#                                    the agent's BTF query answering, `profile --btf-path`
#   node-agent/tests/fuzz_loader.rs  Loader::apply on the real kernel with mutated objects
#                                    (root only; skipped otherwise)
#   fuzz/ (e2e/fuzz/fuzz-afl.sh)          coverage-guided AFL++ (afl crate, stable Rust): object
#                                    inspection and the loader's object check, each to at
#                                    least 1,000,000 executions (BPFPOLY_AFL_* knobs there)
#
# Knobs: BPFPOLY_FUZZ_SECS   seconds per time-bounded target (default 15; ~2 min in all)
#        BPFPOLY_FUZZ_CLI_RUNS mutated BTF files through the CLI (default 60)
#        BPFPOLY_FUZZ_SEED   reproduce a run (printed at the end of each target)
# A panic fails the run; its input is saved under target/fuzz-crashes/.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
export BPFPOLY_FUZZ_SECS="${BPFPOLY_FUZZ_SECS:-15}"
export BPFPOLY_FUZZ_CLI_RUNS="${BPFPOLY_FUZZ_CLI_RUNS:-60}"
REPORT="$REPO/target/fuzz-report.jsonl"
mkdir -p "$REPO/target"
: >"$REPORT"
export BPFPOLY_FUZZ_REPORT="$REPORT"
say() { echo "[bpfpoly] fuzz: $*"; }

make -s -C ebpf >/dev/null
say "building (release)"
cargo test --release -q -p bpfpoly-crds --test fuzz_crds --test fuzz_parsers --no-run 2>&1 | grep -v '^$' || true
cargo test --release -q -p bpfpoly-agent --test fuzz_objects --test fuzz_btf --test fuzz_loader --no-run 2>&1 | grep -v '^$' || true

# A hang is a finding too: each binary gets its budget plus a generous margin.
limit=$(awk -v s="$BPFPOLY_FUZZ_SECS" -v n="$BPFPOLY_FUZZ_CLI_RUNS" 'BEGIN { printf "%d", 4 * s + n + 120 }')
rc=0
say "CR validation and parsers (${BPFPOLY_FUZZ_SECS} s per target)"
timeout "$limit" cargo test --release -p bpfpoly-crds --test fuzz_crds --test fuzz_parsers -- --nocapture 2>&1 \
  | grep -E '^fuzz |panicked|minimal failing|FAILED|^test result' || rc=1
say "objects, BTF, profile CLI"
timeout "$limit" cargo test --release -p bpfpoly-agent --test fuzz_objects --test fuzz_btf -- --nocapture fuzz_ 2>&1 \
  | grep -E '^fuzz |^  \(|panicked|input|FAILED|^test result' || rc=1
if [ "$(id -u)" = 0 ] && [ "${BPFPOLY_SKIP_PRIVILEGED:-0}" != 1 ]; then
  say "Loader::apply on the kernel"
  timeout "$limit" cargo test --release -p bpfpoly-agent --test fuzz_loader -- --nocapture 2>&1 \
    | grep -E '^fuzz |panicked|FAILED|^test result' || rc=1
else
  say "skipping Loader::apply on the kernel (needs root)"
fi
say "coverage-guided: object inspection and the object check (AFL++)"
bash "$REPO/e2e/fuzz/fuzz-afl.sh" || rc=1
# grep -q in a pipeline hides a test failure: look at the per-target records too.
python3 - "$REPORT" <<'EOF' || rc=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
total = sum(r["executions"] for r in rows)
panics = sum(r.get("panics", 0) for r in rows)
print(f"[bpfpoly] fuzz: {len(rows)} targets, {total} executions, {panics} panics")
for r in rows:
    print(f"  {r['executions']:>9}  {r['distinct']:>5} outcomes  {r['seconds']:6.1f} s  {r['target']}")
sys.exit(1 if panics or len(rows) < 8 else 0)
EOF
exit $rc
