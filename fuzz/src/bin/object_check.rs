//! AFL++ target: the loader's object check (`bpfpoly_fuzz::object_check`).
fn main() {
    afl::fuzz!(|data: &[u8]| bpfpoly_fuzz::object_check(data));
}
