//! Time-bounded fuzzing of the whole load path on the real kernel (`make fuzz`): mutated
//! objects that `inspect` lets through go on to aya (relocations, BTF fix-ups, map
//! creation), the verifier, attach and pin, through `Loader::apply`, one update after
//! another on the same program (make-before-break with hostile input).
//!
//! Checks: the loader never panics (it catches aya's panics and reports them as
//! "loading panicked (a bug ...)": counted here as findings), after every apply at most
//! one XDP program is attached to the test interface and exactly the running version is
//! pinned, and after `remove` no program, link or pin of the run is left in the kernel.
//!
//! Needs root (`BPFPOLY_SKIP_PRIVILEGED=1` skips). Knobs as in `fuzz_objects.rs`:
//! `BPFPOLY_FUZZ_SECS` (default 2), `BPFPOLY_FUZZ_SEED`, `BPFPOLY_FUZZ_REPORT`.

#![allow(clippy::unwrap_used)]

mod loader_support;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Instant;

use bpfpoly_agent::fetch::sha256_hex;
use bpfpoly_agent::loader::{Applied, Loader, LoaderConfig, Outcome};
use bpfpoly_crds::state::{Phase, ProgramStatus};
use loader_support::{
    assignment, classifier_config, classifier_dispatch, classifier_variant, eventually,
    prog_exists, xdp_prog_ids, Root, Veth,
};
use object::{Object as _, ObjectSection as _};
use serde_json::json;

#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
use fuzz_knobs::{base_seed as seed, budget, Rng};

/// Byte ranges worth corrupting for the load path: instructions, relocations, maps,
/// BTF, BTF.ext, symbols (not DWARF).
fn targets(bytes: &[u8]) -> Vec<(usize, usize)> {
    let elf = object::File::parse(bytes).unwrap();
    elf.sections()
        .filter_map(|s| {
            let name = s.name().ok()?;
            if name.contains("debug") {
                return None;
            }
            let (start, len) = s.file_range()?;
            (len > 0).then_some((start as usize, len as usize))
        })
        .collect()
}

fn mutate(rng: &mut Rng, bytes: &mut [u8], targets: &[(usize, usize)]) {
    for _ in 0..=rng.below(4) {
        let (start, len) = targets[rng.below(targets.len())];
        match rng.below(3) {
            0 => {
                let at = start + rng.below(len);
                bytes[at] = rng.next() as u8;
            }
            1 => {
                // An instruction's opcode/registers or immediate, 8-byte aligned.
                let at = start + rng.below(len / 8) * 8 + rng.below(2) * 4;
                if at + 4 <= start + len {
                    let v = [0u32, 1, 0xffff_ffff, 0x7fff_ffff, rng.next() as u32][rng.below(5)];
                    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                let at = start + rng.below(len);
                bytes[at] ^= 1 << rng.below(8);
            }
        }
    }
}

fn mapped(id: u64) -> bool {
    prog_exists(u32::try_from(id).unwrap_or(u32::MAX))
}

/// What the run saw.
#[derive(Default)]
struct Tally {
    executions: u64,
    loaded: u64,
    findings: Vec<String>,
    outcomes: BTreeSet<String>,
    ids_seen: BTreeSet<u32>,
}

const NAME: &str = "rel-fuzz-loader";

#[test]
fn fuzz_loader_apply_on_the_kernel() {
    require_privileges!();
    let seed = seed();
    let mut rng = Rng(seed);
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = Loader::new(LoaderConfig {
        bpffs_root: root.0.clone(),
        ..LoaderConfig::default()
    })
    .unwrap();
    let original = bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap();
    let ranges = targets(original);
    let started = Instant::now();
    let deadline = started + budget();
    let mut tally = Tally::default();
    let mut generation = 0i64;
    while Instant::now() < deadline {
        generation += 1;
        let mut bytes = original.to_vec();
        if generation % 8 != 1 {
            mutate(&mut rng, &mut bytes, &ranges);
        }
        let a = assignment_of(&bytes, generation, &veth);
        let input = bytes.clone();
        let fetch = move |_: &bpfpoly_crds::program::Bytecode| Ok(input.clone());
        let applied = loader.apply(&a, &fetch);
        tally.count(&applied, generation, seed, &bytes);
        check_one_version(&root, &veth, generation, &applied.status);
    }
    loader.remove(NAME).unwrap();
    eventually("every program of the run is gone", || {
        tally.ids_seen.iter().all(|&id| !mapped(u64::from(id)))
    });
    assert!(xdp_prog_ids(&veth.a).is_empty());
    assert!(!root.0.join(NAME).exists());
    tally.report(started.elapsed().as_secs_f64(), seed);
    assert!(
        tally.findings.is_empty(),
        "aya panicked on hostile input (caught by the loader):\n{}",
        tally.findings.join("\n")
    );
}

/// The classifier with `bytes` as its object, at `generation`: a digest of its own for
/// every input, so each apply loads.
fn assignment_of(
    bytes: &[u8],
    generation: i64,
    veth: &Veth,
) -> bpfpoly_crds::state::ProgramAssignment {
    let mut variant = classifier_variant("xdp", "packet-classifier-xdp", &veth.a, None);
    variant["bytecode"] = json!({"builtin": "packet-classifier-xdp", "sha256": sha256_hex(bytes)});
    assignment(
        NAME,
        generation,
        vec![variant],
        classifier_config(generation % 2 == 0),
        Some(classifier_dispatch("tailCall")),
    )
}

/// Never two XDP programs on the interface; exactly the running version pinned.
fn check_one_version(root: &Root, veth: &Veth, generation: i64, s: &ProgramStatus) {
    let attached = xdp_prog_ids(&veth.a);
    assert!(attached.len() <= 1, "generation {generation}: {attached:?}");
    let running = matches!(s.phase, Phase::Loaded | Phase::Degraded);
    assert_eq!(
        attached.len(),
        usize::from(running),
        "generation {generation}: {}",
        s.message
    );
    let versions = std::fs::read_dir(root.0.join(NAME))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        versions,
        usize::from(running),
        "generation {generation}: pinned versions"
    );
}

impl Tally {
    /// One apply counted; a panic the loader caught is kept as a finding, with its input
    /// saved under target/fuzz-crashes.
    fn count(&mut self, applied: &Applied, generation: i64, seed: u64, bytes: &[u8]) {
        self.executions += 1;
        let s = &applied.status;
        self.ids_seen.extend(s.program_ids.iter().copied());
        let text = format!(
            "{} {}",
            s.message,
            applied
                .fallbacks
                .iter()
                .map(|f| f.reason.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
        if text.contains("panicked") {
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("loader-{generation}-{seed}.o"));
            let _ = std::fs::write(&file, bytes);
            self.findings
                .push(format!("{}: {}", file.display(), s.message));
        }
        if matches!(applied.outcome, Outcome::Loaded | Outcome::Updated) {
            self.loaded += 1;
        }
        self.outcomes
            .insert(format!("{:?}/{:?}", applied.outcome, s.phase));
    }

    /// The summary line, and one JSON line in `BPFPOLY_FUZZ_REPORT` when set.
    fn report(&self, secs: f64, seed: u64) {
        let Tally {
            executions,
            loaded,
            findings,
            outcomes,
            ..
        } = self;
        println!(
            "fuzz Loader::apply (mutated objects, kernel): {executions} executions in {secs:.1} s ({:.0}/s), {loaded} loaded, {} distinct outcomes {outcomes:?}, {} panics caught by the loader, seed {seed}",
            *executions as f64 / secs,
            outcomes.len(),
            findings.len()
        );
        if let Ok(path) = std::env::var("BPFPOLY_FUZZ_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                // One write per line: targets run on parallel threads and append to one file.
                let _ = f.write_all(format!("{}\n", json!({"crate": "bpfpoly-agent", "target": "Loader::apply (kernel)", "executions": executions,
                        "distinct": outcomes.len(), "panics": findings.len(), "seconds": secs, "seed": seed})).as_bytes());
            }
        }
    }
}
