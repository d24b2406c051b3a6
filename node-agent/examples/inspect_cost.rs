//! What one inspection costs, and how much of it is the loader's own parser:
//! `cargo run --release -p bpfpoly-agent --example inspect_cost -- [-v] FILE|DIR...`
//! times `inspect_bytes`, `inspect_unhashed` (the loader's object check) and aya-obj's
//! `Object::parse` alone on each object (e.g. the seeds, or an AFL++ queue of mutated
//! objects), and prints the distribution and the slowest inputs.
use std::path::PathBuf;
use std::time::Instant;

/// Microseconds per call: the fastest of 15 batches of about 0.3 ms each, so that other
/// work on the machine (preemption) does not count.
fn per_call<T>(mut f: impl FnMut() -> T) -> f64 {
    let start = Instant::now();
    std::hint::black_box(f());
    let once = start.elapsed().as_secs_f64();
    let batch = ((3e-4 / once.max(1e-7)) as u32).clamp(1, 10_000);
    (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..batch {
                std::hint::black_box(f());
            }
            start.elapsed().as_secs_f64() * 1e6 / f64::from(batch)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut verbose = false;
    let mut files: Vec<PathBuf> = Vec::new();
    for arg in std::env::args().skip(1) {
        if arg == "-v" {
            verbose = true;
            continue;
        }
        let path = PathBuf::from(arg);
        match std::fs::read_dir(&path) {
            Ok(dir) => files.extend(dir.flatten().map(|e| e.path()).filter(|p| p.is_file())),
            Err(_) => files.push(path),
        }
    }
    files.sort();
    // (inspect_bytes, inspect_unhashed, aya-obj, accepted, file)
    let mut rows: Vec<(f64, f64, f64, bool, PathBuf)> = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let accepted = bpfpoly_agent::inspect::inspect_bytes(&bytes).is_ok();
        let full = per_call(|| bpfpoly_agent::inspect::inspect_bytes(&bytes).is_ok());
        let unhashed = per_call(|| bpfpoly_agent::inspect::inspect_unhashed(&bytes).is_ok());
        // aya-obj alone only where inspect accepted the object: its checks are what
        // keeps aya-obj's parser from panicking on hostile bytes.
        let aya = if accepted {
            per_call(|| aya_obj::Object::parse(&bytes).is_ok())
        } else {
            0.0
        };
        if verbose {
            println!(
                "{full:8.1} {unhashed:8.1} {aya:8.1} µs  {:>6} B  {}  {}",
                bytes.len(),
                if accepted { "ok " } else { "err" },
                f.display()
            );
        }
        rows.push((full, unhashed, aya, accepted, f));
    }
    if rows.is_empty() {
        return;
    }
    let n = rows.len();
    let mean = |i: usize| rows.iter().map(|r| [r.0, r.1, r.2][i]).sum::<f64>() / n as f64;
    let accepted_n = rows.iter().filter(|r| r.3).count().max(1) as f64;
    let mut full: Vec<f64> = rows.iter().map(|r| r.0).collect();
    full.sort_by(f64::total_cmp);
    let accepted = rows.iter().filter(|r| r.3).count();
    println!(
        "{n} objects ({accepted} accepted): inspect_bytes mean {:.1} µs (p50 {:.1}, p99 {:.1}, max {:.1}); inspect_unhashed mean {:.1} µs; aya-obj Object::parse alone (accepted ones) mean {:.1} µs",
        mean(0), full[n / 2], full[(n * 99 / 100).min(n - 1)], full[n - 1], mean(1), mean(2) * n as f64 / accepted_n
    );
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for r in rows.iter().take(5) {
        println!("  slowest: {:8.1} µs  {}", r.0, r.4.display());
    }
}
