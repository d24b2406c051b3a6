//! The time-bounded proptest runner of the API crate's fuzz tests (`fuzz_crds.rs`,
//! `fuzz_parsers.rs`), included with `#[path]`: strategies run in chunks until the budget is
//! spent, each chunk with its own seed, outcomes tallied by message shape.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use crate::fuzz_knobs::{base_seed, budget};

/// Masks numbers and quoted values: one string per message shape.
pub fn shape(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut prev_digit = false;
    let mut escaped = false;
    for c in message.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
                out.push_str("Q\"");
            }
            continue;
        }
        if c == '"' {
            quoted = true;
            out.push('"');
            continue;
        }
        if c.is_ascii_digit() {
            if !prev_digit {
                out.push('N');
            }
            prev_digit = true;
            continue;
        }
        prev_digit = false;
        out.push(c);
    }
    out.chars().take(160).collect()
}

/// Runs `test` on values of `strategy` until the budget is spent; reports executions and
/// distinct outcomes (the shapes `test` returns).
pub fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<Vec<String>, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let seed = base_seed();
    let executions = AtomicU64::new(0);
    let outcomes = Mutex::new(BTreeSet::new());
    let started = Instant::now();
    let deadline = started + budget();
    let mut chunk = 0u64;
    while Instant::now() < deadline {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..].copy_from_slice(&chunk.to_le_bytes());
        let config = Config {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &bytes));
        let result = runner.run(&strategy, |value| {
            executions.fetch_add(1, Ordering::Relaxed);
            let shapes = test(value)?;
            outcomes.lock().unwrap().extend(shapes);
            Ok(())
        });
        if let Err(e) = result {
            panic!("fuzz {name}: seed {seed} chunk {chunk}: {e}");
        }
        chunk += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = executions.load(Ordering::Relaxed);
    let distinct = outcomes.lock().unwrap().len();
    println!(
        "fuzz {name}: {n} executions in {secs:.1} s ({:.0}/s), {distinct} distinct outcomes, seed {seed}",
        n as f64 / secs
    );
    if let Ok(path) = std::env::var("BPFPOLY_FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: targets run on parallel threads and append to one file.
            let _ = f.write_all(
                format!(
                    "{}\n",
                    serde_json::json!({"crate": "bpfpoly-crds", "target": name, "executions": n,
                    "distinct": distinct, "seconds": secs, "seed": seed})
                )
                .as_bytes(),
            );
        }
    }
}
