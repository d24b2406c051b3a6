#!/usr/bin/env bash
# Coverage-guided fuzzing of object inspection and the loader's object check with AFL++,
# on stable Rust (the `afl` crate: rustc's own SanitizerCoverage, no LLVM plugins, no
# nightly). Part of `make fuzz` (e2e/fuzz/fuzz.sh runs it after the stable-Rust targets).
#
#   fuzz/src/lib.rs   the targets: `inspect` (inspect_bytes) and `object_check` (the
#                     loader's inspect, check_variant under every mechanism, the handler
#                     object check, __kconfig resolution)
#
# Installs what it needs once: cargo-afl (and the AFL++ it builds from its own source)
# under ~/.cache/bpfpoly/afl. The instrumented build goes to $CARGO_TARGET_DIR/afl (or
# target/afl), apart from the normal one. Seeds: ebpf/build/*.o (the built-ins), Debian
# libxdp1's objects, the parity corpus (node-agent/tests/fixtures, built here with clang),
# each also without DWARF. The corpus AFL grows is kept in ~/.cache/bpfpoly/fuzz/<target>
# and seeds the next run.
#
# Each target runs until it has made BPFPOLY_AFL_MIN_EXECS executions (afl-fuzz -E, with 2 %
# to spare), or until its time box ends (afl-fuzz -V); short of the executions, the run fails.
#
# Knobs: BPFPOLY_AFL_MIN_EXECS  executions each target must reach (default 1000000; about
#                               3.5 min per target on one core here)
#        BPFPOLY_AFL_SECS       the most time a target may take (default 600 s)
#        BPFPOLY_AFL_JOBS       targets fuzzed at once (default: 2, one per core, when the
#                               machine is otherwise idle (1-min load < 0.5), else 1)
#        BPFPOLY_AFL_TARGETS    default "inspect object_check"
#        BPFPOLY_FUZZ_REPORT    JSON lines file to append one record per target to
# A crash (any panic: afl's hook aborts before a catch_unwind can hide it) or a hang fails
# the run; its input is copied to target/fuzz-crashes/. Replay one with
#   $CARGO_TARGET_DIR/afl/release/<target> < input
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
AFL_ROOT="$CACHE/afl"
AFL_CRATE_VERSION=0.18.2
CARGO_AFL="$AFL_ROOT/bin/cargo-afl"
# cargo-afl keeps AFL++ and its runtime under $XDG_DATA_HOME/afl.rs.
export XDG_DATA_HOME="$AFL_ROOT/data"
SECS="${BPFPOLY_AFL_SECS:-600}"
MIN_EXECS="${BPFPOLY_AFL_MIN_EXECS:-1000000}"
GOAL=$((MIN_EXECS + MIN_EXECS / 50))
idle_jobs() { awk -v n="$(nproc)" '{ print ($1 < 0.5 && n >= 2) ? 2 : 1 }' /proc/loadavg; }
JOBS="${BPFPOLY_AFL_JOBS:-$(idle_jobs)}"
TARGETS="${BPFPOLY_AFL_TARGETS:-inspect object_check}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
BUILD="$TARGET_DIR/afl"
WORK="$REPO/target/afl-work"
KEPT="$CACHE/fuzz"
CRASHES="$REPO/target/fuzz-crashes"
say() { echo "[bpfpoly] fuzz (AFL++): $*"; }
die() { echo "[bpfpoly] ERROR: fuzz (AFL++): $*" >&2; exit 1; }

# --- install (cached) --------------------------------------------------------------------
rustc_release=$(rustc -V | awk '{print $2}')
runtime_built() {
    compgen -G "$XDG_DATA_HOME/afl.rs/rustc-$rustc_release-*/afl.rs-$AFL_CRATE_VERSION/afl-llvm/afl-compiler-rt.o" >/dev/null
}
if [[ ! -x $CARGO_AFL ]] || ! PATH="$AFL_ROOT/bin:$PATH" cargo afl --version 2>/dev/null | grep -q "$AFL_CRATE_VERSION"; then
    say "installing cargo-afl $AFL_CRATE_VERSION and AFL++ into $AFL_ROOT (once, about 2 min)"
    mkdir -p "$AFL_ROOT"
    cargo install --quiet --locked --force --root "$AFL_ROOT" --version "$AFL_CRATE_VERSION" cargo-afl
fi
if ! runtime_built; then
    # A new rustc needs AFL++'s runtime built for it.
    say "building AFL++ for rustc $rustc_release"
    PATH="$AFL_ROOT/bin:$PATH" cargo afl config --build --force
fi
runtime_built || die "AFL++ runtime missing under $XDG_DATA_HOME/afl.rs after the build"
AFL_FUZZ=$(compgen -G "$XDG_DATA_HOME/afl.rs/rustc-$rustc_release-*/afl.rs-$AFL_CRATE_VERSION/afl/bin/afl-fuzz" | head -1)
[[ -x $AFL_FUZZ ]] || die "afl-fuzz missing under $XDG_DATA_HOME/afl.rs"

# --- build -------------------------------------------------------------------------------
make -s -C ebpf >/dev/null
say "building the instrumented targets (release, into $BUILD)"
(cd fuzz && PATH="$AFL_ROOT/bin:$PATH" CARGO_TARGET_DIR="$BUILD" cargo afl build --release --locked --quiet)

# --- seeds -------------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK/seeds" "$CRASHES"
multiarch=$(clang -print-multiarch 2>/dev/null || true)
for src in node-agent/tests/fixtures/parity/*.c node-agent/tests/fixtures/kconfig/kconfig_externs.c; do
    clang -O2 -g -target bpf -c "$src" -o "$WORK/seeds/parity-$(basename "${src%.c}").o" \
        -idirafter "/usr/include/$multiarch" || die "clang $src"
done
for o in ebpf/build/*.o; do cp "$o" "$WORK/seeds/build-$(basename "$o")"; done
xdp=$(dpkg -L libxdp1 2>/dev/null | grep '\.o$' || true)
[[ -n $xdp ]] || die "libxdp1 is not installed (make deps installs it); its objects are seeds"
for o in $xdp; do cp "$o" "$WORK/seeds/libxdp-$(basename "$o")"; done
# Without DWARF too: smaller inputs, so more of AFL's mutations land where the parsers read.
for o in "$WORK"/seeds/*.o; do llvm-strip -g "$o" -o "${o%.o}-nodwarf.o"; done
seeds=$(find "$WORK/seeds" -name '*.o' | wc -l)

# --- fuzz --------------------------------------------------------------------------------
fuzz_one() {
    local t=$1 bin="$BUILD/release/$1" in="$WORK/$1/in" out="$WORK/$1/out"
    mkdir -p "$in" "$KEPT/$t"
    cp "$WORK"/seeds/*.o "$in/"
    # Each seed must go through cleanly outside AFL (replay mode: one input on stdin).
    for s in "$in"/*.o; do "$bin" <"$s" || die "$t: seed $(basename "$s") fails outside AFL"; done
    find "$KEPT/$t" -maxdepth 1 -type f -name 'id*' -exec cp -t "$in/" {} +
    AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_QUIET=1 \
        AFL_FAST_CAL=1 \
        "$AFL_FUZZ" -i "$in" -o "$out" -E "$GOAL" -V "$SECS" -t 500 -m none -- "$bin" \
        >"$WORK/$t.log" 2>&1 || { tail -20 "$WORK/$t.log" >&2; die "$t: afl-fuzz failed (log $WORK/$t.log)"; }
    # Keep what AFL found for the next run.
    rm -rf "$KEPT/$t.new" && mkdir -p "$KEPT/$t.new"
    find "$out/default/queue" -maxdepth 1 -type f -name 'id*' -exec cp -t "$KEPT/$t.new/" {} +
    rm -rf "$KEPT/$t" && mv "$KEPT/$t.new" "$KEPT/$t"
    for kind in crashes hangs; do
        find "$out/default/$kind" -maxdepth 1 -type f -name 'id*' 2>/dev/null | while read -r f; do
            cp "$f" "$CRASHES/afl-$t-$kind-$(sha256sum "$f" | cut -c1-16).bin"
        done
    done
}

say "$seeds seeds; $GOAL executions per target (at most ${SECS} s each), $JOBS at once (load average $(cut -d' ' -f1-3 /proc/loadavg)); targets: $TARGETS"
rc=0
if ((JOBS > 1)); then
    pids=()
    for t in $TARGETS; do fuzz_one "$t" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
else
    for t in $TARGETS; do fuzz_one "$t" || rc=1; done
fi

# --- report ------------------------------------------------------------------------------
python3 - "$WORK" "$MIN_EXECS" "${BPFPOLY_FUZZ_REPORT:-}" "$CRASHES" $TARGETS <<'EOF' || rc=1
import json, os, sys
work, min_execs, report, crashes, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
bad = False
for t in targets:
    stats_file = os.path.join(work, t, "out", "default", "fuzzer_stats")
    if not os.path.exists(stats_file):
        print(f"[bpfpoly] ERROR: fuzz (AFL++): {t}: no fuzzer_stats (see {work}/{t}.log)")
        bad = True
        continue
    s = dict(l.split(":", 1) for l in open(stats_file).read().splitlines() if ":" in l)
    s = {k.strip(): v.strip() for k, v in s.items()}
    execs, secs = int(s["execs_done"]), int(s["run_time"])
    found, hangs = int(s["saved_crashes"]), int(s["saved_hangs"])
    print(f"fuzz afl {t}: {execs} executions in {secs} s ({execs / max(secs, 1):.0f}/s), "
          f"{s['corpus_count']} in the corpus, {s['edges_found']} edges ({s['bitmap_cvg']}), "
          f"{found} crashes, {hangs} hangs, stability {s['stability']}")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"crate": "bpfpoly-fuzz (AFL++)", "target": f"afl {t} (coverage-guided)",
                                "executions": execs, "distinct": int(s["edges_found"]),
                                "panics": found + hangs, "seconds": secs,
                                "corpus": int(s["corpus_count"])}) + "\n")
    if found or hangs:
        print(f"[bpfpoly] ERROR: fuzz (AFL++): {t}: {found} crashes, {hangs} hangs; inputs in {crashes}/afl-{t}-*")
        bad = True
    if execs < min_execs:
        load = open("/proc/loadavg").read().split()[:3]
        print(f"[bpfpoly] ERROR: fuzz (AFL++): {t}: {execs} executions, fewer than {min_execs} "
              f"(load average now {' '.join(load)}: other work on the machine slows it; BPFPOLY_AFL_SECS raises the time box)")
        bad = True
sys.exit(1 if bad else 0)
EOF
exit $rc
