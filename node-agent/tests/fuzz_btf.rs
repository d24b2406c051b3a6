//! Time-bounded fuzzing of the agent's BTF reading (`make fuzz`, e2e/fuzz/fuzz.sh): raw BTF
//! mutated (the objects' `.BTF`, the running kernel's and Debian 6.1's) through
//! `KernelBtf::from_bytes` and query answering in process, and through
//! `bpfpoly-agent profile --btf-path` for the exit codes. The agent's `btf` module is private
//! to the binary, so it is compiled into this test from its source (`#[path]`), unchanged.
//! Knobs, mutations and reporting as in `fuzz_objects.rs`.

#![allow(clippy::unwrap_used)]

/// `btf.rs`'s own unit tests refer to `crate::builtin`.
mod builtin {
    pub use bpfpoly_agent::builtin::*;
}

#[allow(dead_code)]
#[path = "../src/btf.rs"]
mod btf;

#[path = "../../test-support/btf_mutations.rs"]
mod btf_mutations;
#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
#[path = "../../test-support/fuzz_tally.rs"]
mod fuzz_tally;
#[path = "../../test-support/object_mutations.rs"]
mod object_mutations;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use bpfpoly_crds::requirement::Query;

use btf_mutations::*;
use fuzz_knobs::{base_seed, budget, Rng};
use fuzz_tally::*;
use object_mutations::*;

/// The agent's BTF module (`KernelBtf::from_bytes`, `answer`) on mutated BTF: the
/// objects' `.BTF` (small, every kind a compiler emits) and, now and then, the running
/// kernel's and Debian 6.1's (large).
#[test]
fn fuzz_btf_query_answering() {
    let seed = base_seed();
    let mut rng = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
    let mut seeds: Vec<Vec<u8>> = corpus().iter().filter_map(|(_, b)| object_btf(b)).collect();
    let small = seeds.len();
    for big in [
        PathBuf::from("/sys/kernel/btf/vmlinux"),
        dirs_home().join(".cache/bpfpoly/btf/debian-6.1-cloud.btf"),
    ] {
        if let Ok(b) = std::fs::read(&big) {
            seeds.push(b);
        }
    }
    let queries: Vec<Vec<Query>> = seeds.iter().map(|b| btf_queries(b)).collect();
    for (b, q) in seeds.iter().zip(&queries) {
        let parsed = btf::KernelBtf::from_bytes(b, Path::new("seed")).unwrap();
        // Sanity: the queries taken from a BTF hold on it.
        let held = q.iter().filter(|q| parsed.answer(q) == Some(true)).count();
        assert!(
            held + 5 >= q.len(),
            "{held} of {} seed queries hold",
            q.len()
        );
    }
    let mut tally = Tally::new("btf from_bytes + answer (mutated BTF)", seed);
    let deadline = Instant::now() + budget();
    let mut answered = 0u64;
    let mut big_runs = 0u64;
    quiet_panics(|| {
        while Instant::now() < deadline {
            // A big BTF costs ~10^4 small ones (seconds in a debug build): at most one
            // every 10 s of budget.
            let big_allowed = big_runs < 1 + tally.started.elapsed().as_secs() / 10;
            let i = if seeds.len() > small && big_allowed && rng.chance(50) {
                big_runs += 1;
                small + rng.below(seeds.len() - small)
            } else {
                rng.below(small)
            };
            let mut bytes = seeds[i].clone();
            for _ in 0..=rng.below(4) {
                if rng.chance(8) {
                    let cut = rng.below(bytes.len());
                    bytes.truncate(cut);
                } else if !bytes.is_empty() {
                    mutate_btf(&mut rng, &mut bytes);
                }
            }
            tally.executions += 1;
            let result = catch_unwind(AssertUnwindSafe(|| {
                let parsed = btf::KernelBtf::from_bytes(&bytes, Path::new("fuzz"))?;
                let answers: Vec<Option<bool>> =
                    queries[i].iter().map(|q| parsed.answer(q)).collect();
                Ok::<_, btf::BtfError>(answers)
            }));
            match result {
                Err(p) => tally.panicked("btf", &bytes, &panic_text(&*p)),
                Ok(Err(e)) => {
                    tally.outcomes.insert(shape(&e.to_string()));
                }
                Ok(Ok(a)) => {
                    answered += a.len() as u64;
                    let t = a.iter().filter(|x| **x == Some(true)).count();
                    tally.outcomes.insert(format!(
                        "parsed; answers {}",
                        if t == a.len() {
                            "all true"
                        } else {
                            "some false"
                        }
                    ));
                }
            }
        }
    });
    println!("  ({answered} queries answered on mutated BTF; {big_runs} runs on kernel-sized BTF)");
    tally.finish();
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `bpfpoly-agent profile --btf-path MUTATED --query ...`: exit 0 with JSON or 1 with a
/// message naming the file, never a panic or a signal, never 2 (the queries are valid).
#[test]
fn fuzz_btf_through_the_profile_cli() {
    let runs: usize = std::env::var("BPFPOLY_FUZZ_CLI_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed = base_seed();
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let seed_btf =
        object_btf(bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap()).unwrap();
    let queries: Vec<String> = btf_queries(&seed_btf)
        .iter()
        .take(12)
        .map(ToString::to_string)
        .collect();
    let dir = std::env::temp_dir().join(format!("bpfpoly-fuzz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs: Vec<(PathBuf, Vec<u8>)> = (0..runs)
        .map(|n| {
            let mut b = seed_btf.clone();
            for _ in 0..=rng.below(3) {
                if rng.chance(6) {
                    let cut = rng.below(b.len());
                    b.truncate(cut);
                } else if !b.is_empty() {
                    mutate_btf(&mut rng, &mut b);
                }
            }
            let f = dir.join(format!("{n}.btf"));
            std::fs::write(&f, &b).unwrap();
            (f, b)
        })
        .collect();
    let mut tally = Tally::new("profile --btf-path (mutated BTF, CLI)", seed);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for chunk in inputs.chunks(runs.div_ceil(6).max(1)) {
            let queries = &queries;
            let results = &results;
            s.spawn(move || {
                for (f, b) in chunk {
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpfpoly-agent"));
                    cmd.arg("profile").arg("--btf-path").arg(f);
                    for q in queries {
                        cmd.args(["--query", q]);
                    }
                    let out = cmd.output().unwrap();
                    results.lock().unwrap().push((f.clone(), b.clone(), out));
                }
            });
        }
    });
    for (f, b, out) in results.into_inner().unwrap() {
        tally.executions += 1;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert!(v["answers"].is_object(), "{}: {v}", f.display());
                tally.outcomes.insert("exit 0".into());
            }
            Some(1) if !stderr.contains("panicked") => {
                assert!(
                    stderr.contains(&f.display().to_string()),
                    "the file is named: {stderr}"
                );
                tally.outcomes.insert(format!(
                    "exit 1: {}",
                    shape(&stderr.replace(&f.display().to_string(), "FILE"))
                ));
            }
            code => tally.panicked(
                "profile CLI",
                &b,
                &format!("exit {code:?}: {}", stderr.trim()),
            ),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    tally.finish();
}
