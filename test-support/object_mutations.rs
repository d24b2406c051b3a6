//! The object corpus and structure-aware object mutations for the fuzz tests (included
//! with `#[path]`): built-ins, `ebpf/build/*.o`, the parity corpus and libxdp1's objects;
//! ELF header, section header and symbol fields set to boundary values, byte noise aimed at
//! what the parsers read, truncation, insertion and deletion, spliced section data.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bpfpoly_agent::inspect::inspect_bytes;
use object::{Object as _, ObjectSection as _};

use crate::btf_mutations::{interesting, mutate_btf, write_le};
use crate::fuzz_knobs::Rng;

// The corpus.

pub fn libxdp_objects() -> Vec<PathBuf> {
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
pub fn parity_corpus() -> Vec<(String, Vec<u8>)> {
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

pub fn corpus() -> Vec<(String, Vec<u8>)> {
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
pub struct Layout {
    /// (start, len) of the ELF header, section header table and non-DWARF sections.
    pub regions: Vec<(usize, usize)>,
    /// Offsets of 8/4/2-byte header fields: (offset, width).
    pub fields: Vec<(usize, usize)>,
    /// Sections by name: (start, len).
    pub sections: BTreeMap<String, (usize, usize)>,
}

pub fn layout(bytes: &[u8]) -> Layout {
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

/// One to eight mutations of `bytes`.
pub fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, lay: &Layout, others: &[(String, Vec<u8>)]) {
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
