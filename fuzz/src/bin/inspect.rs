//! AFL++ target: object inspection (`bpfpoly_fuzz::inspect`).
fn main() {
    afl::fuzz!(|data: &[u8]| bpfpoly_fuzz::inspect(data));
}
