fn main() { println!("bpfpoly-agent: not built yet"); }
