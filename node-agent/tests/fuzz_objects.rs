//! Time-bounded fuzzing of what the agent reads from untrusted sources (`make fuzz`,
//! e2e/fuzz/fuzz.sh): eBPF objects (ELF and their BTF) through `inspect_bytes` and the
//! loader's object check, raw kernel BTF through the agent's BTF query answering
//! (in process, and through `bpfpoly-agent profile --btf-path` for the exit codes).
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

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use bpfpoly_agent::inspect::inspect_bytes;
use bpfpoly_agent::loader::object::check::{check_variant, resolve_auto};
use bpfpoly_agent::loader::object::{inspect, Mechanism};
use bpfpoly_crds::program::{Dispatch, Variant};
use bpfpoly_crds::requirement::Query;
use bpfpoly_crds::state::ResolvedConfig;
use object::{Object as _, ObjectSection as _};
use serde_json::json;

// ---------------------------------------------------------------------------------------
// Knobs, randomness, reporting.

#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
use fuzz_knobs::{base_seed, budget, Rng};

/// Masks numbers so one message shape counts once.
fn shape(message: &str) -> String {
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

struct Tally {
    name: &'static str,
    seed: u64,
    started: Instant,
    executions: u64,
    outcomes: BTreeSet<String>,
    panics: Vec<String>,
}

impl Tally {
    fn new(name: &'static str, seed: u64) -> Self {
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
    fn panicked(&mut self, what: &str, input: &[u8], message: &str) {
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

    fn finish(self) {
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

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Panics are expected to be caught here: keep them off stderr while fuzzing.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
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

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let message = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    let at = LOCATION.with(|c| c.borrow().clone());
    format!("{message} at {at}")
}

// ---------------------------------------------------------------------------------------
// The corpus.

fn libxdp_objects() -> Vec<PathBuf> {
    let listed = Command::new("dpkg")
        .args(["-L", "libxdp1"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut out: Vec<PathBuf> = listed
        .lines()
        .filter(|l| l.ends_with(".o"))
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// (name, bytes) of every seed object.
/// The parity corpus (tests/fixtures/parity/*.c and the kconfig fixture), built with
/// clang: `__kconfig` externs and libbpf-only section names take the rewrite path.
fn parity_corpus() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("parity"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.push(root.join("kconfig/kconfig_externs.c"));
    sources.sort();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_parity_seeds");
    std::fs::create_dir_all(&dir).unwrap();
    let multiarch = Command::new("clang")
        .arg("-print-multiarch")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    sources
        .into_iter()
        .map(|source| {
            let out = dir.join(source.with_extension("o").file_name().unwrap());
            let built = Command::new("clang")
                .args(["-O2", "-g", "-target", "bpf", "-c"])
                .arg(&source)
                .arg("-o")
                .arg(&out)
                .args(["-idirafter", &format!("/usr/include/{multiarch}")])
                .output()
                .expect("clang");
            assert!(built.status.success(), "clang {}", source.display());
            (source.display().to_string(), std::fs::read(&out).unwrap())
        })
        .collect()
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = bpfpoly_agent::builtin::names()
        .iter()
        .map(|n| {
            (
                format!("builtin:{n}"),
                bpfpoly_agent::builtin::builtin(n).unwrap().to_vec(),
            )
        })
        .collect();
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/build");
    if let Ok(dir) = std::fs::read_dir(&build) {
        let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "o"))
        {
            let bytes = std::fs::read(&f).unwrap();
            if !out.iter().any(|(_, b)| *b == bytes) {
                out.push((f.display().to_string(), bytes));
            }
        }
    }
    for (name, bytes) in parity_corpus() {
        out.push((name, bytes));
    }
    let xdp = libxdp_objects();
    if xdp.is_empty() {
        eprintln!("note: libxdp1 is not installed; fuzzing without its objects");
    }
    for f in xdp {
        out.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for (name, bytes) in &out {
        assert!(
            inspect_bytes(bytes).is_ok(),
            "seed {name} must inspect cleanly"
        );
    }
    out
}

/// Where the parsers look in one object: file ranges, and the fields worth setting.
struct Layout {
    /// (start, len) of the ELF header, section header table and non-DWARF sections.
    regions: Vec<(usize, usize)>,
    /// Offsets of 8/4/2-byte header fields: (offset, width).
    fields: Vec<(usize, usize)>,
    /// Sections by name: (start, len).
    sections: BTreeMap<String, (usize, usize)>,
}

fn layout(bytes: &[u8]) -> Layout {
    let elf = object::File::parse(bytes).unwrap();
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap()) as usize;
    let (shoff, shnum) = (u64_at(0x28), u16_at(0x3c));
    let mut regions = vec![(0, 64), (shoff, shnum * 64)];
    // e_type, e_machine, e_shoff, e_flags, e_shentsize, e_shnum, e_shstrndx.
    let mut fields = vec![
        (16, 2),
        (18, 2),
        (0x28, 8),
        (0x30, 4),
        (0x3a, 2),
        (0x3c, 2),
        (0x3e, 2),
    ];
    for i in 0..shnum {
        let sh = shoff + i * 64;
        // sh_name, sh_type, sh_flags, sh_offset, sh_size, sh_link, sh_info, sh_entsize.
        for (off, w) in [
            (0, 4),
            (4, 4),
            (8, 8),
            (24, 8),
            (32, 8),
            (40, 4),
            (44, 4),
            (56, 8),
        ] {
            fields.push((sh + off, w));
        }
    }
    let mut sections = BTreeMap::new();
    for s in elf.sections() {
        let name = s.name().unwrap_or("").to_string();
        let Some((start, len)) = s.file_range() else {
            continue;
        };
        let (start, len) = (start as usize, len as usize);
        if len == 0 || name.starts_with(".debug") || name.starts_with(".rel.debug") {
            continue;
        }
        regions.push((start, len));
        if name == ".symtab" {
            for sym in (start..start + len).step_by(24) {
                // st_name, st_info, st_shndx, st_value, st_size.
                for (off, w) in [(0, 4), (4, 1), (6, 2), (8, 8), (16, 8)] {
                    fields.push((sym + off, w));
                }
            }
        }
        if name.starts_with(".rel") {
            for rel in (start..start + len).step_by(16) {
                fields.push((rel, 8));
                fields.push((rel + 8, 8));
            }
        }
        sections.insert(name, (start, len));
    }
    if let Some(&(start, _)) = sections.get(".BTF") {
        for off in [4, 8, 12, 16, 20] {
            fields.push((start + off, 4));
        }
    }
    if let Some(&(start, _)) = sections.get(".BTF.ext") {
        for off in (4..32).step_by(4) {
            fields.push((start + off, 4));
        }
    }
    Layout {
        regions,
        fields,
        sections,
    }
}

fn interesting(rng: &mut Rng, len: usize) -> u64 {
    const VALUES: &[u64] = &[
        0,
        1,
        2,
        7,
        8,
        0x40,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x7fff,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        u64::MAX / 2,
        u64::MAX,
    ];
    match rng.below(4) {
        0 => len as u64 + rng.below(3) as u64,
        1 => (len as u64).saturating_sub(rng.below(64) as u64),
        _ => VALUES[rng.below(VALUES.len())],
    }
}

fn write_le(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    if at + width <= bytes.len() {
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
}

/// One to eight mutations of `bytes`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, lay: &Layout, others: &[(String, Vec<u8>)]) {
    for _ in 0..=rng.below(8) {
        if bytes.is_empty() {
            return;
        }
        match rng.below(12) {
            // Noise where the parsers read.
            0..=2 => {
                let (start, len) = lay.regions[rng.below(lay.regions.len())];
                let at = (start + rng.below(len.max(1))).min(bytes.len() - 1);
                bytes[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    2 => bytes[at] ^ (1 << rng.below(8)),
                    _ => rng.next() as u8,
                };
            }
            // A header field set to a boundary value.
            3..=5 => {
                let (at, width) = lay.fields[rng.below(lay.fields.len())];
                let value = interesting(rng, bytes.len());
                write_le(bytes, at, width, value);
            }
            // BTF rewired (see `mutate_btf`).
            6 | 7 => {
                if let Some(&(start, len)) = lay.sections.get(".BTF") {
                    if start + len <= bytes.len() {
                        let mut btf = bytes[start..start + len].to_vec();
                        mutate_btf(rng, &mut btf);
                        bytes[start..start + len].copy_from_slice(&btf);
                    }
                }
            }
            // Truncation.
            8 => {
                let cut = rng.below(bytes.len());
                bytes.truncate(cut.max(1));
            }
            // Insertion or deletion: every later offset shifts.
            9 => {
                let at = rng.below(bytes.len());
                if rng.chance(2) {
                    let n = 1 + rng.below(64);
                    let end = (at + n).min(bytes.len());
                    bytes.drain(at..end);
                } else {
                    let junk: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
                    bytes.splice(at..at, junk);
                }
            }
            // Section data from another object (same name when it has one).
            _ => {
                let (_, other) = &others[rng.below(others.len())];
                let names: Vec<&String> = lay.sections.keys().collect();
                let name = names[rng.below(names.len())];
                let (start, len) = lay.sections[name];
                if start >= bytes.len() {
                    continue;
                }
                let Ok(o) = object::File::parse(other.as_slice()) else {
                    continue;
                };
                let donor = o
                    .section_by_name(name)
                    .or_else(|| o.sections().nth(rng.below(o.sections().count())))
                    .and_then(|s| s.data().ok())
                    .unwrap_or_default();
                let n = donor.len().min(len).min(bytes.len().saturating_sub(start));
                bytes[start..start + n].copy_from_slice(&donor[..n]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// BTF.

/// A BTF type record: its id, byte offset in the blob, kind and vlen.
struct TypeRecord {
    id: u32,
    at: usize,
    kind: u32,
    vlen: usize,
}

/// Walks the type section of well-formed BTF (the seeds), little-endian.
fn btf_types(btf: &[u8]) -> Vec<TypeRecord> {
    let word = |at: usize| -> Option<u32> {
        btf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let (Some(hdr), Some(type_off), Some(type_len)) = (word(4), word(8), word(12)) else {
        return Vec::new();
    };
    let start = hdr as usize + type_off as usize;
    let end = start + type_len as usize;
    let mut out = Vec::new();
    let mut at = start;
    let mut id = 1;
    while at + 12 <= end.min(btf.len()) {
        let info = word(at + 4).unwrap();
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            2 | 7..=12 | 16 | 18 => 0,
            _ => return out,
        };
        out.push(TypeRecord { id, at, kind, vlen });
        at += 12 + extra;
        id += 1;
    }
    out
}

/// Rewires BTF: loops, bad references, bad kinds and counts, header fields.
fn mutate_btf(rng: &mut Rng, btf: &mut [u8]) {
    let types = btf_types(btf);
    let put = |btf: &mut [u8], at: usize, v: u32| write_le(btf, at, 4, u64::from(v));
    if types.is_empty() {
        let at = rng.below(btf.len().max(1));
        put(btf, at, rng.next() as u32);
        return;
    }
    let last = types.last().map_or(1, |t| t.id);
    let t = &types[rng.below(types.len())];
    match rng.below(9) {
        // A reference kind pointing at itself (typedef/const/volatile/ptr/func loop).
        0 | 1 => {
            let refs: Vec<&TypeRecord> = types
                .iter()
                .filter(|t| matches!(t.kind, 2 | 8..=12 | 18))
                .collect();
            if let Some(r) = refs.get(rng.below(refs.len())) {
                put(btf, r.at + 8, r.id);
            }
        }
        // Two references pointing at each other.
        2 => {
            let refs: Vec<&TypeRecord> = types
                .iter()
                .filter(|t| matches!(t.kind, 2 | 8..=11 | 18))
                .collect();
            if refs.len() >= 2 {
                let (a, b) = (refs[rng.below(refs.len())], refs[rng.below(refs.len())]);
                put(btf, a.at + 8, b.id);
                put(btf, b.at + 8, a.id);
            }
        }
        // An anonymous member whose type is its own struct.
        3 => {
            let composites: Vec<&TypeRecord> = types
                .iter()
                .filter(|t| matches!(t.kind, 4 | 5) && t.vlen > 0)
                .collect();
            if let Some(c) = composites.get(rng.below(composites.len())) {
                let m = c.at + 12 + 12 * rng.below(c.vlen);
                put(btf, m, 0);
                put(btf, m + 4, c.id);
            }
        }
        // An array of itself.
        4 => {
            if let Some(a) = types.iter().find(|t| t.kind == 3) {
                put(btf, a.at + 12, a.id);
            }
        }
        // A type reference anywhere, to any id (maybe out of range).
        5 => {
            let id = if rng.chance(2) {
                1 + rng.below(last as usize) as u32
            } else {
                interesting(rng, last as usize) as u32
            };
            put(btf, t.at + 8, id);
        }
        // vlen or kind.
        6 => {
            let info = u32::from_le_bytes(btf[t.at + 4..t.at + 8].try_into().unwrap());
            let info = if rng.chance(2) {
                (info & !0xffff) | (interesting(rng, t.vlen) as u32 & 0xffff)
            } else {
                (info & !(0x1f << 24)) | ((rng.below(32) as u32) << 24)
            };
            put(btf, t.at + 4, info);
        }
        // Name offset.
        7 => put(btf, t.at, interesting(rng, btf.len()) as u32),
        // Header field.
        _ => {
            let at = 4 * (1 + rng.below(5));
            put(btf, at, interesting(rng, btf.len()) as u32);
        }
    }
}

/// The `.BTF` of an object.
fn object_btf(bytes: &[u8]) -> Option<Vec<u8>> {
    let elf = object::File::parse(bytes).ok()?;
    Some(elf.section_by_name(".BTF")?.data().ok()?.to_vec())
}

/// Queries a BTF can answer, true and false ones: its struct/union names and members,
/// enums and enumerators, functions; and a few that are not there.
fn btf_queries(btf: &[u8]) -> Vec<Query> {
    let word = |at: usize| {
        btf.get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let strings = word(4) as usize + word(16) as usize;
    let name = |off: u32| -> String {
        let at = strings + off as usize;
        btf.get(at..)
            .map(|s| {
                String::from_utf8_lossy(&s[..s.iter().position(|&c| c == 0).unwrap_or(0)])
                    .into_owned()
            })
            .unwrap_or_default()
    };
    let mut out = vec![
        "type:struct task_struct",
        "field:struct nope.x",
        "enum:enum bpf_map_type.BPF_MAP_TYPE_ARRAY",
        "func:do_sys_openat2",
        "type:typedef __u32",
    ]
    .into_iter()
    .map(|q| Query::parse(q).unwrap())
    .collect::<Vec<_>>();
    for t in btf_types(btf) {
        let n = name(word(t.at));
        if n.is_empty() {
            continue;
        }
        let members = |size: usize| (0..t.vlen).map(move |i| t.at + 12 + size * i);
        let q = match t.kind {
            4 | 5 => {
                let kind = if t.kind == 4 { "struct" } else { "union" };
                for m in members(12) {
                    let f = name(word(m));
                    if !f.is_empty() {
                        out.extend(Query::parse(&format!("field:{kind} {n}.{f}")));
                    }
                }
                format!("type:{kind} {n}")
            }
            6 | 19 => {
                for m in members(if t.kind == 6 { 8 } else { 12 }) {
                    out.extend(Query::parse(&format!("enum:enum {n}.{}", name(word(m)))));
                }
                format!("type:enum {n}")
            }
            8 => format!("type:typedef {n}"),
            12 => format!("func:{n}"),
            _ => continue,
        };
        out.extend(Query::parse(&q));
    }
    out
}

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

/// The agent's BTF module (`KernelBtf::from_bytes`, `answer`) on mutated BTF: the
/// objects' `.BTF` (small, every kind a compiler emits) and, now and then, the running
/// kernel's and Debian 6.1's (large).
#[test]
fn fuzz_btf_query_answering() {
    let seed = base_seed();
    let mut rng = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
    let mut seeds: Vec<Vec<u8>> = corpus().iter().filter_map(|(_, b)| object_btf(b)).collect();
    let small = seeds.len();
    for big in [
        PathBuf::from("/sys/kernel/btf/vmlinux"),
        dirs_home().join(".cache/bpfpoly/btf/debian-6.1-cloud.btf"),
    ] {
        if let Ok(b) = std::fs::read(&big) {
            seeds.push(b);
        }
    }
    let queries: Vec<Vec<Query>> = seeds.iter().map(|b| btf_queries(b)).collect();
    for (b, q) in seeds.iter().zip(&queries) {
        let parsed = btf::KernelBtf::from_bytes(b, Path::new("seed")).unwrap();
        // Sanity: the queries taken from a BTF hold on it.
        let held = q.iter().filter(|q| parsed.answer(q) == Some(true)).count();
        assert!(
            held + 5 >= q.len(),
            "{held} of {} seed queries hold",
            q.len()
        );
    }
    let mut tally = Tally::new("btf from_bytes + answer (mutated BTF)", seed);
    let deadline = Instant::now() + budget();
    let mut answered = 0u64;
    let mut big_runs = 0u64;
    quiet_panics(|| {
        while Instant::now() < deadline {
            // A big BTF costs ~10^4 small ones (seconds in a debug build): at most one
            // every 10 s of budget.
            let big_allowed = big_runs < 1 + tally.started.elapsed().as_secs() / 10;
            let i = if seeds.len() > small && big_allowed && rng.chance(50) {
                big_runs += 1;
                small + rng.below(seeds.len() - small)
            } else {
                rng.below(small)
            };
            let mut bytes = seeds[i].clone();
            for _ in 0..=rng.below(4) {
                if rng.chance(8) {
                    let cut = rng.below(bytes.len());
                    bytes.truncate(cut);
                } else if !bytes.is_empty() {
                    mutate_btf(&mut rng, &mut bytes);
                }
            }
            tally.executions += 1;
            let result = catch_unwind(AssertUnwindSafe(|| {
                let parsed = btf::KernelBtf::from_bytes(&bytes, Path::new("fuzz"))?;
                let answers: Vec<Option<bool>> =
                    queries[i].iter().map(|q| parsed.answer(q)).collect();
                Ok::<_, btf::BtfError>(answers)
            }));
            match result {
                Err(p) => tally.panicked("btf", &bytes, &panic_text(&*p)),
                Ok(Err(e)) => {
                    tally.outcomes.insert(shape(&e.to_string()));
                }
                Ok(Ok(a)) => {
                    answered += a.len() as u64;
                    let t = a.iter().filter(|x| **x == Some(true)).count();
                    tally.outcomes.insert(format!(
                        "parsed; answers {}",
                        if t == a.len() {
                            "all true"
                        } else {
                            "some false"
                        }
                    ));
                }
            }
        }
    });
    println!("  ({answered} queries answered on mutated BTF; {big_runs} runs on kernel-sized BTF)");
    tally.finish();
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `bpfpoly-agent profile --btf-path MUTATED --query ...`: exit 0 with JSON or 1 with a
/// message naming the file, never a panic or a signal, never 2 (the queries are valid).
#[test]
fn fuzz_btf_through_the_profile_cli() {
    let runs: usize = std::env::var("BPFPOLY_FUZZ_CLI_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed = base_seed();
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let seed_btf =
        object_btf(bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap()).unwrap();
    let queries: Vec<String> = btf_queries(&seed_btf)
        .iter()
        .take(12)
        .map(ToString::to_string)
        .collect();
    let dir = std::env::temp_dir().join(format!("bpfpoly-fuzz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs: Vec<(PathBuf, Vec<u8>)> = (0..runs)
        .map(|n| {
            let mut b = seed_btf.clone();
            for _ in 0..=rng.below(3) {
                if rng.chance(6) {
                    let cut = rng.below(b.len());
                    b.truncate(cut);
                } else if !b.is_empty() {
                    mutate_btf(&mut rng, &mut b);
                }
            }
            let f = dir.join(format!("{n}.btf"));
            std::fs::write(&f, &b).unwrap();
            (f, b)
        })
        .collect();
    let mut tally = Tally::new("profile --btf-path (mutated BTF, CLI)", seed);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for chunk in inputs.chunks(runs.div_ceil(6).max(1)) {
            let queries = &queries;
            let results = &results;
            s.spawn(move || {
                for (f, b) in chunk {
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpfpoly-agent"));
                    cmd.arg("profile").arg("--btf-path").arg(f);
                    for q in queries {
                        cmd.args(["--query", q]);
                    }
                    let out = cmd.output().unwrap();
                    results.lock().unwrap().push((f.clone(), b.clone(), out));
                }
            });
        }
    });
    for (f, b, out) in results.into_inner().unwrap() {
        tally.executions += 1;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert!(v["answers"].is_object(), "{}: {v}", f.display());
                tally.outcomes.insert("exit 0".into());
            }
            Some(1) if !stderr.contains("panicked") => {
                assert!(
                    stderr.contains(&f.display().to_string()),
                    "the file is named: {stderr}"
                );
                tally.outcomes.insert(format!(
                    "exit 1: {}",
                    shape(&stderr.replace(&f.display().to_string(), "FILE"))
                ));
            }
            code => tally.panicked(
                "profile CLI",
                &b,
                &format!("exit {code:?}: {}", stderr.trim()),
            ),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    tally.finish();
}
