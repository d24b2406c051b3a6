//! Knobs and randomness shared by the time-bounded fuzz tests of every crate (each includes
//! this file with `#[path]`): `BPFPOLY_FUZZ_SECS` per target, `BPFPOLY_FUZZ_SEED` to
//! reproduce a run, and a small seeded generator.

// Each including test uses a different part.
#![allow(dead_code)]

use std::time::Duration;

/// Time per target, from `BPFPOLY_FUZZ_SECS` (default 2 s, at least 0.1 s).
pub fn budget() -> Duration {
    let secs: f64 = std::env::var("BPFPOLY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.1))
}

/// `BPFPOLY_FUZZ_SEED`, or the clock; never 0 (xorshift would stay at 0).
pub fn base_seed() -> u64 {
    std::env::var("BPFPOLY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1
}

/// xorshift64*: small, fast, reproducible from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `one_in`.
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
}
