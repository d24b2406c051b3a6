//! A seeded xorshift64 generator for the tests that corrupt inputs: the same seed gives the
//! same corruptions on every run. Included with `#[path]` by the unit tests of
//! `node-agent/src/inspect.rs` and `node-agent/src/btf.rs`.

/// The generator: each call gives the next value of the sequence from `seed` (not zero).
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
