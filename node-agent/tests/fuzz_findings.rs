//! Every input AFL++ found in `make fuzz` (`fuzz/findings/`), replayed through the same
//! calls as the coverage-guided targets: `inspect_bytes`, the loader's object check, and
//! the `__kconfig` resolution with a fixed kernel. Each once panicked or took seconds in
//! the agent; each must now be answered (accepted or refused with a reason) without a
//! panic. A new finding is added to the directory and is replayed here from then on.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use bpfpoly_agent::inspect::inspect_bytes;
use bpfpoly_agent::kconfig::{self, system::parse_config, KernelFacts};
use bpfpoly_agent::loader::object;

fn findings() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/findings");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_afl_finding_is_answered_without_a_panic() {
    let inputs = findings();
    assert!(
        inputs.len() >= 11,
        "fuzz/findings holds the 11 inputs of the first AFL++ run, found {}",
        inputs.len()
    );
    let facts = KernelFacts::fixed(
        "6.1.0-fuzz",
        parse_config("CONFIG_BPF=y\nCONFIG_HZ=250\n", "fixed"),
        true,
        true,
    );
    for (name, bytes) in &inputs {
        let inspected = inspect_bytes(bytes);
        let checked = object::inspect(bytes);
        let resolved = kconfig::resolve_object(bytes, &facts);
        println!(
            "{name}: inspect {}, object check {}, kconfig {}",
            inspected
                .as_ref()
                .map_or_else(|e| format!("refused ({e})"), |_| "accepted".into()),
            checked
                .as_ref()
                .map_or_else(|e| format!("refused ({e})"), |_| "accepted".into()),
            match &resolved {
                Ok(Some(_)) => "rewritten".to_string(),
                Ok(None) => "nothing to resolve".to_string(),
                Err(p) => format!("refused ({})", p.join("; ")),
            }
        );
        // What inspect accepts, the loader's own check accepts too: both guard aya's parser.
        assert_eq!(
            inspected.is_ok(),
            checked.is_ok(),
            "{name}: inspect and the loader's object check disagree"
        );
    }
}
