//! Reporting for the fuzz tests of node-agent/tests (`fuzz_objects.rs`, `fuzz_btf.rs`),
//! included with `#[path]`: a tally of executions and distinct outcomes per target, panics
//! caught with their input saved under `target/fuzz-crashes/`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

/// Masks numbers so one message shape counts once.
pub fn shape(message: &str) -> String {
    let mut out = String::new();
    let mut prev_digit = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !prev_digit {
                out.push('N');
            }
            prev_digit = true;
        } else {
            prev_digit = false;
            out.push(c);
        }
    }
    out.chars().take(140).collect()
}

pub struct Tally {
    pub name: &'static str,
    pub seed: u64,
    pub started: Instant,
    pub executions: u64,
    pub outcomes: BTreeSet<String>,
    pub panics: Vec<String>,
}

impl Tally {
    pub fn new(name: &'static str, seed: u64) -> Self {
        Self {
            name,
            seed,
            started: Instant::now(),
            executions: 0,
            outcomes: BTreeSet::new(),
            panics: Vec::new(),
        }
    }

    /// Saves the input of a panic and remembers it.
    pub fn panicked(&mut self, what: &str, input: &[u8], message: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!(
            "{}-{:016x}.bin",
            self.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            fxhash(input)
        ));
        let _ = std::fs::write(&file, input);
        if self.panics.len() < 20 {
            self.panics
                .push(format!("{what}: {message} (input {})", file.display()));
        }
    }

    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        println!(
            "fuzz {}: {} executions in {secs:.1} s ({:.0}/s), {} distinct outcomes, {} panics, seed {}",
            self.name,
            self.executions,
            self.executions as f64 / secs,
            self.outcomes.len(),
            self.panics.len(),
            self.seed
        );
        if let Ok(path) = std::env::var("BPFPOLY_FUZZ_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                // One write per line: targets run on parallel threads and append to one file.
                let _ = f.write_all(format!("{}\n", json!({"crate": "bpfpoly-agent", "target": self.name, "executions": self.executions,
                        "distinct": self.outcomes.len(), "panics": self.panics.len(), "seconds": secs, "seed": self.seed})).as_bytes());
            }
        }
        assert!(
            self.panics.is_empty(),
            "fuzz {}: panics on hostile input:\n{}",
            self.name,
            self.panics.join("\n")
        );
    }
}

pub fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Panics are expected to be caught here: keep them off stderr while fuzzing.
pub fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if let Some(l) = info.location() {
            LOCATION.with(|c| *c.borrow_mut() = format!("{}:{}", l.file(), l.line()));
        }
    }));
    let out = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    match out {
        Ok(v) => v,
        Err(p) => panic!("the fuzz harness itself panicked: {}", panic_text(&*p)),
    }
}

thread_local! {
    /// Where the last caught panic happened.
    static LOCATION: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let message = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    let at = LOCATION.with(|c| c.borrow().clone());
    format!("{message} at {at}")
}
