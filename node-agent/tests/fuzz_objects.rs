//! Time-bounded fuzzing of what the agent reads from untrusted sources (`make fuzz`,
//! e2e/fuzz/fuzz.sh): eBPF objects (ELF and their BTF) through `inspect_bytes` and the
//! loader's object check, and (in `fuzz_btf.rs`) raw kernel BTF through the agent's BTF query
//! answering, in process and through `bpfpoly-agent profile --btf-path`.
//!
//! Seeds: every built-in object, every `ebpf/build/*.o`, the parity corpus (built here
//! with clang), and Debian libxdp1's objects (`dpkg -L libxdp1`). Mutations are structure-aware: ELF header, section header and
//! symbol fields set to boundary values, byte noise aimed at what the parsers read (not
//! DWARF), truncation, insertion/deletion, section data spliced from another object,
//! and BTF type records rewired into loops (self-referencing typedefs/pointers, anonymous
//! members containing their own struct, arrays of themselves), huge vlens, bad kinds.
//!
//! A panic is a bug: it is caught, its input saved under `target/fuzz-crashes/`, and the
//! test fails at the end with the list. The agent's `btf` module is private to the binary,
//! so it is compiled into this test from its source (`#[path]`), unchanged.
//!
//! Knobs: `BPFPOLY_FUZZ_SECS` (seconds per in-process target, default 2),
//! `BPFPOLY_FUZZ_CLI_RUNS` (mutated BTF files run through the CLI, default 12; each run
//! probes the kernel, ~1.5 s, 6 in parallel), `BPFPOLY_FUZZ_SEED`, `BPFPOLY_FUZZ_REPORT`
//! (file to append one JSON line per target to). "Distinct outcomes" counts error
//! messages with numbers masked: a cheap proxy for the parser branches reached.

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
use std::time::Instant;

use bpfpoly_agent::inspect::inspect_bytes;
use bpfpoly_agent::loader::object::check::{check_variant, resolve_auto};
use bpfpoly_agent::loader::object::{inspect, Mechanism};
use bpfpoly_crds::program::{Dispatch, Variant};
use bpfpoly_crds::state::ResolvedConfig;
use serde_json::json;

use fuzz_knobs::{base_seed, budget, Rng};
use fuzz_tally::*;
use object_mutations::*;

// ---------------------------------------------------------------------------------------
// Targets.

fn classifier_check() -> (Variant, Vec<ResolvedConfig>, Dispatch) {
    let variant: Variant = serde_json::from_value(json!({
        "name": "v",
        "bytecode": {"builtin": "packet-classifier-xdp"},
        "programs": [
            {"name": "classify", "attach": {"xdp": {"interfaces": ["eth0"]}}},
            {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
        ]
    }))
    .unwrap();
    let config: Vec<ResolvedConfig> = serde_json::from_value(json!([
        {"name": "count_bytes", "type": "bool", "value": "true"},
        {"name": "vlan_aware", "type": "bool", "value": "true"}
    ]))
    .unwrap();
    let dispatch: Dispatch = serde_json::from_value(json!({
        "entry": "classify",
        "slots": [{"key": 6, "handler": "handle_tcp"}, {"key": 17, "handler": "handle_udp"},
                  {"key": 1, "handler": "handle_icmp"}]
    }))
    .unwrap();
    (variant, config, dispatch)
}

/// `inspect_bytes` (ELF checks, BTF checks, aya's parser, globals) and then the loader's
/// object check against a variant, on mutated objects.
#[test]
fn fuzz_object_inspection() {
    let seed = base_seed();
    let mut rng = Rng(seed);
    let corpus = corpus();
    let layouts: Vec<Layout> = corpus.iter().map(|(_, b)| layout(b)).collect();
    let (variant, config, dispatch) = classifier_check();
    let mut tally = Tally::new("inspect_bytes + check_variant (mutated objects)", seed);
    let deadline = Instant::now() + budget();
    let mut accepted = 0u64;
    quiet_panics(|| {
        while Instant::now() < deadline {
            for _ in 0..64 {
                let i = rng.below(corpus.len());
                let mut bytes = corpus[i].1.clone();
                mutate(&mut rng, &mut bytes, &layouts[i], &corpus);
                tally.executions += 1;
                let result = catch_unwind(AssertUnwindSafe(|| inspect_bytes(&bytes)));
                match result {
                    Err(p) => tally.panicked("inspect_bytes", &bytes, &panic_text(&*p)),
                    Ok(Err(e)) => {
                        tally.outcomes.insert(shape(&e.to_string()));
                    }
                    Ok(Ok(_)) => {
                        accepted += 1;
                        tally.outcomes.insert("accepted".into());
                        let checked = catch_unwind(AssertUnwindSafe(|| {
                            let info = inspect(&bytes).map_err(|e| vec![e.to_string()])?;
                            let m = resolve_auto(&info, &dispatch, false);
                            check_variant(&info, &variant, &config, Some((&dispatch, m)))?;
                            check_variant(
                                &info,
                                &variant,
                                &config,
                                Some((&dispatch, Mechanism::Static)),
                            )
                        }));
                        match checked {
                            Err(p) => tally.panicked("check_variant", &bytes, &panic_text(&*p)),
                            Ok(Err(problems)) => {
                                for p in problems {
                                    tally.outcomes.insert(format!("check: {}", shape(&p)));
                                }
                            }
                            Ok(Ok(())) => {
                                tally.outcomes.insert("check ok".into());
                            }
                        }
                    }
                }
            }
        }
    });
    println!("  ({accepted} mutated objects were still accepted by inspect)");
    tally.finish();
}
