//! Dispatch overhead with BPF_PROG_TEST_RUN (part 1 of `make bench`, `e2e/bench/bench.sh`).
//!
//! Runs the same frames through the same handler work behind each dispatch mechanism and
//! prints one JSON document: result rows (`{name, value, unit, anchor, anchor_value,
//! ratio, target, met}`) and the raw samples.
//!
//! What runs (all XDP, all loaded here with aya, all given the same frame):
//! - `empty`: the classifier source built with `CLASSIFIER_ENTRY_HOOK` = `return
//!   XDP_PASS` (bench.sh builds it): the cost of the test_run loop itself.
//! - `direct`: the classifier source built with a `CLASSIFIER_ENTRY_HOOK` that parses and
//!   runs the handler body (`classifier_account`) and returns: the same parse + handler
//!   work with no dispatch at all (no key switch, no `bpfpoly_dispatch` counter, no tail
//!   call). The floor.
//! - `static`: built-in `packet-classifier-xdp`, `bpfpoly_dispatch_mode` = 1 (static),
//!   `bpfpoly_handler_mask` = the three handlers.
//! - `tailcall`: built-in `packet-classifier-xdp`, mode 0, `jump_table` filled with
//!   `handle_icmp`/`handle_tcp`/`handle_udp`.
//! - `libxdp`: libxdp's `xdp-dispatcher.o` with `.rodata` `conf` saying one program slot
//!   (`num_progs_enabled` = 1, `chain_call_actions[0]` = PASS | XDP_DISPATCHER_RETVAL, as
//!   libxdp writes it). libxdp fills slots with freplace, which this kernel refuses
//!   (EPERM), so `prog0` stays the stub: this measures the dispatcher's own cost. Its cost
//!   with the handler is estimated as `direct + (libxdp - empty)`.
//! - freplace: tried (classifier with mode 2 + the freplace object); reported as not
//!   available when the kernel refuses it.
//!
//! Timing: for each run, `repeat` iterations in one BPF_PROG_TEST_RUN; ns per packet =
//! this thread's CPU time across the syscall / repeat (CLOCK_THREAD_CPUTIME_ID: excludes
//! time the thread was preempted, which the wall clock would count on a busy machine;
//! sub-ns resolution, unlike the kernel's `duration`, which is already divided by
//! `repeat` and truncated to whole ns; it is kept as a cross-check).
//!
//! Interleaved: each round runs every configuration once per frame, round-robin
//! (empty, direct, static, tail call, libxdp), starting one further along each round, never
//! one configuration's runs in a block, so machine noise falls on all alike. Medians are
//! reported with their spread: the runs' p10-p90 and min-max, and the per-round ratio (a
//! run over the same round's anchor run) as median and p10-p90.
//!
//! Loaded `--instances` times (3): each load puts the JIT'd image at another address, and
//! where it falls on cache lines moved the direct handler alone between 8.7 and 10.1 ns a
//! packet from one run of this benchmark to the next, unchanged. A round's sample of a
//! configuration is the mean over its instances, so no ratio rests on one placement.
//!
//! Usage (root): `bench_dispatch --direct D.o --empty E.o [--libxdp X.o] [--runs N]
//! [--repeat R] [--instances K] [--jited-dir DIR]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod frames;
mod jited;
mod rows;
mod stats;
mod subjects;

use std::{collections::BTreeMap, path::PathBuf};

use aya::programs::Xdp;
use serde_json::{json, Value};

use crate::stats::round;
use crate::subjects::{builtin, classifier, libxdp, read, try_freplace, Subject, XDP_PASS};

struct Args {
    direct: PathBuf,
    empty: PathBuf,
    libxdp: Option<PathBuf>,
    runs: usize,
    repeat: u32,
    instances: usize,
    jited_dir: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        direct: PathBuf::new(),
        empty: PathBuf::new(),
        libxdp: None,
        runs: 9,
        repeat: 1_000_000,
        instances: 3,
        jited_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--direct" => a.direct = value().into(),
            "--empty" => a.empty = value().into(),
            "--libxdp" => a.libxdp = Some(value().into()),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--repeat" => a.repeat = value().parse().expect("--repeat N"),
            "--instances" => a.instances = value().parse().expect("--instances K"),
            "--jited-dir" => a.jited_dir = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.direct.as_os_str().is_empty() && !a.empty.as_os_str().is_empty(),
        "usage: bench_dispatch --direct D.o --empty E.o [--libxdp X.o] [--runs N] [--repeat R] [--instances K]"
    );
    assert!(a.runs >= 5, "--runs must be at least 5");
    assert!(a.repeat >= 1_000_000, "--repeat must be at least 1000000");
    assert!(a.instances >= 1, "--instances must be at least 1");
    a
}

/// One CPU, so the per-CPU maps and caches stay put between runs.
fn pin_to_cpu0() {
    // SAFETY: plain libc calls on a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The configurations that load here, each `instances` times (every load puts its JIT'd
/// image at another address, and how it falls on cache lines moves one program's time by
/// up to a tenth: several loads average that out), in instance-major order, and why
/// libxdp's does not load (when it does not).
fn load_subjects(args: &Args) -> (Vec<Subject>, Option<String>) {
    let direct_bytes = read(&args.direct);
    let empty_bytes = read(&args.empty);
    let mut subjects = Vec::new();
    let mut libxdp_note = None;
    for _ in 0..args.instances {
        subjects.extend([
            classifier("empty", &empty_bytes, 0, false),
            classifier("direct", &direct_bytes, 1, false),
            classifier("static", builtin("packet-classifier-xdp"), 1, false),
            classifier("tailcall", builtin("packet-classifier-xdp"), 0, true),
        ]);
        libxdp_note = match &args.libxdp {
            Some(p) if p.exists() => {
                subjects.push(libxdp(p));
                None
            }
            Some(p) => Some(format!("{} not found", p.display())),
            None => Some("no --libxdp object given".to_owned()),
        };
    }
    (subjects, libxdp_note)
}

/// The first instance of each configuration.
fn firsts(subjects: &[Subject]) -> Vec<&Subject> {
    let mut seen = std::collections::BTreeSet::new();
    subjects.iter().filter(|s| seen.insert(s.key)).collect()
}

/// Dumps every configuration's JIT'd image (and the handler the tail call jumps to).
fn dump_all_jited(dir: &std::path::Path, subjects: &[Subject]) -> serde_json::Map<String, Value> {
    let mut jit = serde_json::Map::new();
    let syms = jited::kallsyms();
    for s in firsts(subjects) {
        jit.insert(
            s.key.to_owned(),
            jited::dump_jited(dir, s.key, s.xdp(), &syms),
        );
    }
    if let Some(t) = subjects.iter().find(|s| s.key == "tailcall") {
        let handler: &Xdp = t.ebpf.program("handle_tcp").unwrap().try_into().unwrap();
        jit.insert(
            "tailcall handle_tcp".into(),
            jited::dump_jited(dir, "tailcall-handle_tcp", handler, &syms),
        );
    }
    jit
}

type Frames = [(&'static str, Vec<u8>); 2];

/// Every subject returns PASS for these frames (the dispatcher through its chain); then a
/// warm-up (JIT'd images and maps into cache, CPU frequency up).
fn check_and_warm_up(subjects: &[Subject], frames: &Frames, repeat: u32) {
    for (fname, frame) in frames {
        for s in subjects {
            let (_, _, verdict) = s.run(frame, 1);
            assert_eq!(verdict, XDP_PASS, "{}/{fname}: verdict", s.key);
        }
    }
    for (_, frame) in frames {
        for s in subjects {
            s.run(frame, repeat / 4);
        }
    }
}

/// Per (frame, configuration), one sample per round, in round order: the mean of that
/// round's runs of the configuration's instances.
#[derive(Default)]
struct Samples {
    cpu: BTreeMap<(&'static str, &'static str), Vec<f64>>,
    kernel: BTreeMap<(&'static str, &'static str), Vec<f64>>,
}

/// `runs` rounds; in each, every frame through every instance of every configuration once,
/// round-robin, the order rotated by one each round.
fn measure(subjects: &[Subject], frames: &Frames, args: &Args) -> Samples {
    let mut samples = Samples::default();
    let n = subjects.len();
    let k = args.instances as f64;
    for round_i in 0..args.runs {
        for (fname, frame) in frames {
            let mut round: BTreeMap<&'static str, (f64, f64)> = BTreeMap::new();
            for j in 0..n {
                let s = &subjects[(j + round_i) % n];
                let (cpu, kernel, _) = s.run(frame, args.repeat);
                let sum = round.entry(s.key).or_default();
                (sum.0, sum.1) = (sum.0 + cpu, sum.1 + f64::from(kernel));
            }
            for (key, (cpu, kernel)) in round {
                samples.cpu.entry((fname, key)).or_default().push(cpu / k);
                samples
                    .kernel
                    .entry((fname, key))
                    .or_default()
                    .push(kernel / k);
            }
        }
    }
    samples
}

/// The rows of every frame, and the raw samples by frame and configuration.
fn rows_and_detail(
    subjects: &[Subject],
    frames: &Frames,
    samples: &Samples,
) -> (Vec<Value>, Value) {
    let mut rows = Vec::new();
    let mut detail = serde_json::Map::new();
    for (fname, _) in frames {
        let mut runs: BTreeMap<&str, Vec<f64>> = firsts(subjects)
            .into_iter()
            .filter_map(|s| Some((s.key, samples.cpu.get(&(*fname, s.key))?.clone())))
            .collect();
        rows::add_libxdp_estimate(&mut runs);
        rows.extend(rows::frame_rows(fname, &runs));
        let per: serde_json::Map<String, Value> = firsts(subjects)
            .into_iter()
            .map(|s| {
                let key = (*fname, s.key);
                let cpu: Vec<f64> = samples.cpu[&key].iter().map(|x| round(*x, 3)).collect();
                (
                    s.key.to_owned(),
                    json!({"cpu_ns_per_pkt": cpu, "kernel_duration_ns": samples.kernel[&key]}),
                )
            })
            .collect();
        detail.insert((*fname).to_owned(), Value::Object(per));
    }
    (rows, Value::Object(detail))
}

/// Kernel run-time statistics (BPF_ENABLE_STATS, held by any process, e.g. a running bpfpoly
/// agent) add two clock reads to every program run: flag them, they skew the floor.
fn stats_warning(subjects: &[Subject]) -> Option<Value> {
    let on = subjects
        .iter()
        .any(|s| s.xdp().info().map(|i| i.run_count() > 0).unwrap_or(false));
    on.then(|| {
        json!({
            "name": "dispatch: WARNING kernel BPF run-time statistics were ON during these runs",
            "value": null, "unit": "n/a", "anchor": null, "anchor_value": null, "ratio": null,
            "target": null, "met": null,
            "note": "BPF_ENABLE_STATS was held by another process (e.g. a running bpfpoly agent, \
                     `make run`): every program run also pays two clock reads, so every figure \
                     above includes that constant and the ratios understate the dispatch overhead",
        })
    })
}

fn main() {
    let args = args();
    pin_to_cpu0();
    let (subjects, libxdp_note) = load_subjects(&args);
    let freplace = match try_freplace() {
        Ok(_) => "loaded".to_owned(),
        Err(reason) => reason,
    };
    let jit = args
        .jited_dir
        .as_deref()
        .map(|dir| dump_all_jited(dir, &subjects))
        .unwrap_or_default();
    let frames: Frames = [
        ("ipv4-tcp", frames::ipv4_tcp()),
        ("ipv6-udp", frames::ipv6_udp()),
    ];
    check_and_warm_up(&subjects, &frames, args.repeat);
    let samples = measure(&subjects, &frames, &args);
    let (mut rows, detail) = rows_and_detail(&subjects, &frames, &samples);
    let warning = stats_warning(&subjects);
    rows.extend(warning.clone());
    rows.push(json!({
        "name": "dispatch: freplace dispatch", "value": null, "unit": "n/a",
        "anchor": "direct handler", "anchor_value": null, "ratio": null,
        "target": "ratio <= 1.10", "met": null, "note": freplace,
    }));
    let doc = json!({
        "section": "dispatch",
        "runs": args.runs,
        "repeat": args.repeat,
        "instances": args.instances,
        "order": "round-robin: each round runs every instance of every configuration once per frame, the order rotated by one each round; a round's sample of a configuration is the mean over its instances",
        "clock": "CLOCK_THREAD_CPUTIME_ID across BPF_PROG_TEST_RUN / repeat",
        "program_ids": subjects.iter().fold(BTreeMap::<&str, Vec<u32>>::new(), |mut m, s| {
            m.entry(s.key).or_default().push(s.id());
            m
        }),
        "freplace": freplace,
        "kernel_run_stats_on": warning.is_some(),
        "jit": jit,
        "libxdp_note": libxdp_note,
        "rows": rows,
        "samples": detail,
    });
    println!("{doc}");
}
