//! Offline inspection of an eBPF object: its programs, maps and `.rodata`/
//! `.data`/`.bss` globals with their BTF types. No syscalls: `aya-obj` parses
//! the object exactly as the loader will, `btf-rs` reads the object's BTF, and
//! the `object` crate gives the ELF symbols (global offsets in a relocatable
//! object live there, not in BTF).
//!
//! Objects are untrusted (a `path` or `configMap` bytecode source), so the ELF
//! is checked for the things the loader's parser takes on trust (section and
//! symbol bounds, sizes) before it runs, and every problem is an error.

use std::{collections::BTreeMap, path::Path};

use aya_obj::{maps::Map, EbpfSectionKind, Object, ParseError, ProgramSection};
use bpfpoly_crds::requirement::MAP_TYPES;

use crate::kconfig::btf_raw::RawBtf;

mod elf_checks;
mod error;
use elf_checks::{check_elf, section_data};
pub use error::{InspectError, MAX_SECTIONS};
mod object_btf;
use object::{ObjectSection, ObjectSymbol, SectionIndex, SymbolKind};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Default cap on an object file's size.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 << 20;

/// What an object contains.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectInfo {
    /// SHA-256 of the object bytes (what `bytecode.sha256` pins).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The `license` section (GPL when absent, as the loader assumes).
    pub license: String,
    /// Whether the object carries BTF.
    pub btf: bool,
    /// Whether it has CO-RE relocations (needs the kernel's BTF to load).
    pub core_relocations: bool,
    /// Programs, by C function name.
    pub programs: Vec<ProgramInfo>,
    /// Non-program functions (subprograms; global ones are freplace slots).
    pub functions: Vec<String>,
    /// Maps, including the data maps the loader makes for `.rodata`/`.data`/`.bss`.
    pub maps: Vec<MapInfo>,
    /// Globals in the data sections.
    pub globals: Vec<GlobalInfo>,
    /// `__kconfig` externs, which the loader fills from the node's kernel.
    pub externs: Vec<crate::kconfig::Extern>,
}

/// One program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProgramInfo {
    /// C function name (what a variant's `programs[].name` refers to).
    pub name: String,
    /// ELF section (`SEC(...)`).
    pub section: String,
    /// Kernel program type (bpftool name).
    #[serde(rename = "type")]
    pub program_type: String,
}

/// One map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapInfo {
    /// Map name (the symbol, or the section name for data maps).
    pub name: String,
    /// ELF section.
    pub section: String,
    /// How it is defined: `btf` (`.maps`), `legacy` (`maps`), `data` (globals).
    pub definition: String,
    /// Kernel map type (bpftool name).
    #[serde(rename = "type")]
    pub map_type: String,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Maximum entries.
    pub max_entries: u32,
    /// `map_flags`.
    pub flags: u32,
}

/// One global variable in a data section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalInfo {
    /// Variable name.
    pub name: String,
    /// ELF section (`.rodata`, `.data`, `.bss`, or `.rodata.NAME`...).
    pub section: String,
    /// Type through typedefs and qualifiers: `bool`, `u8`..`u64`, `i8`..`i64`,
    /// `enum X`, `struct X`, `u8[16]`, `pointer`; `unknown` without BTF.
    #[serde(rename = "type")]
    pub type_name: String,
    /// The type as declared, e.g. `const volatile __u32`.
    pub declared: String,
    /// Size in bytes.
    pub size: u64,
    /// Offset in its section.
    pub offset: u64,
}

/// Reads (at most `max_bytes`) and inspects an object file.
pub fn inspect_file(path: &Path, max_bytes: u64) -> Result<ObjectInfo, InspectError> {
    let bytes = crate::capped::read_path(path, max_bytes)?;
    inspect_bytes(&bytes)
}

/// Inspects object bytes: checks the ELF, parses it as the loader does, and
/// lists programs, maps and globals.
pub fn inspect_bytes(bytes: &[u8]) -> Result<ObjectInfo, InspectError> {
    inspect_with(bytes, true)
}

/// `inspect_bytes` without the SHA-256 (`sha256` is left empty), for the loader's
/// object check: the fetch has verified the digest already, and hashing is about a
/// tenth of an inspection.
pub fn inspect_unhashed(bytes: &[u8]) -> Result<ObjectInfo, InspectError> {
    inspect_with(bytes, false)
}

fn inspect_with(bytes: &[u8], digest: bool) -> Result<ObjectInfo, InspectError> {
    if bytes.is_empty() {
        return Err(InspectError::Empty);
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Err(InspectError::NotElf);
    }
    // The ELF reader casts headers in place and refuses misaligned input.
    let mut copy = Vec::new();
    let bytes = aligned(bytes, &mut copy);
    let elf = object::File::parse(bytes).map_err(|e| InspectError::Malformed(e.to_string()))?;
    let sections = check_elf(&elf)?;
    let btf = match section_data(&elf, ".BTF").filter(|d| !d.is_empty()) {
        Some(raw) => Some(
            object_btf::parse(raw).map_err(|e| InspectError::Malformed(format!(".BTF: {e}")))?,
        ),
        None => None,
    };

    // `__kconfig` externs are resolved, and libbpf-only section names renamed, before
    // the loader's parser runs; the layout does not depend on the extern values, so
    // zeros stand in for the node's.
    let externs = crate::kconfig::externs(&elf).map_err(InspectError::Extern)?;
    let mut resolved_copy = Vec::new();
    let resolved;
    let parsed = if !crate::kconfig::elf::needs_rewrite(&elf, &externs) {
        bytes
    } else {
        resolved =
            crate::kconfig::elf::resolve(bytes, &externs, &crate::kconfig::zero_values(&externs))
                .map_err(InspectError::Loader)?;
        aligned(&resolved, &mut resolved_copy)
    };
    let obj = Object::parse(parsed).map_err(|e| InspectError::Loader(parse_error(&e)))?;
    let section_name = |index: usize| {
        sections
            .get(&index)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| crate::kconfig::RESOLVED_SECTION.to_owned())
    };

    let mut programs: Vec<ProgramInfo> = obj
        .programs
        .iter()
        .map(|(name, p)| ProgramInfo {
            name: name.clone(),
            section: section_name(p.section_index),
            program_type: program_type(&p.section).to_string(),
        })
        .collect();
    programs.sort_by(|a, b| a.name.cmp(&b.name));

    let program_keys: Vec<(usize, u64)> = obj.programs.values().map(|p| p.function_key()).collect();
    let mut functions: Vec<String> = obj
        .functions
        .iter()
        .filter(|(key, _)| !program_keys.contains(key))
        .map(|(_, f)| f.name.clone())
        .collect();
    functions.sort();

    let mut maps: Vec<MapInfo> = obj
        .maps
        .iter()
        .map(|(name, m)| map_info(name, m, section_name(m.section_index())))
        .collect();
    maps.sort_by(|a, b| a.name.cmp(&b.name));

    let globals = globals(&elf, &obj, btf.as_ref());

    Ok(ObjectInfo {
        sha256: if digest {
            hex::encode(Sha256::digest(bytes))
        } else {
            String::new()
        },
        size: bytes.len() as u64,
        license: obj.license.to_string_lossy().into_owned(),
        btf: obj.btf.is_some(),
        core_relocations: obj.has_btf_relocations(),
        programs,
        functions,
        maps,
        globals,
        externs: externs.kconfig,
    })
}

/// `bytes`, or an 8-byte-aligned copy of them in `buf`.
fn aligned<'a>(bytes: &'a [u8], buf: &'a mut Vec<u8>) -> &'a [u8] {
    if bytes.as_ptr().align_offset(8) == 0 {
        return bytes;
    }
    buf.resize(bytes.len() + 7, 0);
    let start = buf.as_ptr().align_offset(8).min(7);
    let out = &mut buf[start..start + bytes.len()];
    out.copy_from_slice(bytes);
    out
}

/// The loader's errors hide their cause in fields without `source`; spell it out.
fn parse_error(e: &ParseError) -> String {
    let mut msg = match e {
        ParseError::ElfError(inner) => format!("ELF: {inner}"),
        ParseError::SectionError { index, error } => format!("section {index}: {error}"),
        other => other.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// bpftool's program type name for a section kind.
fn program_type(section: &ProgramSection) -> &'static str {
    match section {
        ProgramSection::KProbe
        | ProgramSection::KRetProbe
        | ProgramSection::UProbe { .. }
        | ProgramSection::URetProbe { .. } => "kprobe",
        ProgramSection::TracePoint => "tracepoint",
        ProgramSection::SocketFilter => "socket_filter",
        ProgramSection::Xdp { .. } => "xdp",
        ProgramSection::SkMsg => "sk_msg",
        ProgramSection::SkSkbStream { .. } => "sk_skb",
        ProgramSection::SockOps => "sock_ops",
        ProgramSection::SchedClassifier => "sched_cls",
        ProgramSection::CgroupSkb { .. } => "cgroup_skb",
        ProgramSection::CgroupSockAddr { .. } => "cgroup_sock_addr",
        ProgramSection::CgroupSysctl => "cgroup_sysctl",
        ProgramSection::CgroupSockopt { .. } => "cgroup_sockopt",
        ProgramSection::LircMode2 => "lirc_mode2",
        ProgramSection::PerfEvent => "perf_event",
        ProgramSection::RawTracePoint => "raw_tracepoint",
        ProgramSection::Lsm { .. } | ProgramSection::LsmCgroup => "lsm",
        ProgramSection::BtfTracePoint
        | ProgramSection::FEntry { .. }
        | ProgramSection::FExit { .. }
        | ProgramSection::Iter { .. } => "tracing",
        ProgramSection::FlowDissector => "flow_dissector",
        ProgramSection::Extension => "ext",
        ProgramSection::SkLookup => "sk_lookup",
        ProgramSection::SkReuseport { .. } => "sk_reuseport",
        ProgramSection::CgroupSock { .. } => "cgroup_sock",
        ProgramSection::CgroupDevice => "cgroup_device",
    }
}

fn map_info(name: &str, map: &Map, section: String) -> MapInfo {
    let definition = match map.section_kind() {
        EbpfSectionKind::BtfMaps => "btf",
        EbpfSectionKind::Maps => "legacy",
        _ => "data",
    };
    let map_type = MAP_TYPES
        .iter()
        .find(|(_, id)| *id == map.map_type())
        .map(|(n, _)| (*n).to_string())
        .unwrap_or_else(|| format!("unknown({})", map.map_type()));
    MapInfo {
        name: name.to_string(),
        section,
        definition: definition.to_string(),
        map_type,
        key_size: map.key_size(),
        value_size: map.value_size(),
        max_entries: map.max_entries(),
        flags: map.map_flags(),
    }
}

/// Globals of the data sections the loader turns into maps. With BTF they come
/// from its DATASECs (names and types); without, from the ELF symbols.
fn globals(elf: &object::File<'_>, obj: &Object, btf: Option<&RawBtf<'_>>) -> Vec<GlobalInfo> {
    use object::Object as _;
    // Data sections by name, with each defined symbol's (offset, size).
    let mut data_sections: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    let mut by_index: BTreeMap<usize, String> = BTreeMap::new();
    for m in obj.maps.values() {
        if matches!(
            m.section_kind(),
            EbpfSectionKind::Data | EbpfSectionKind::Rodata | EbpfSectionKind::Bss
        ) {
            if let Ok(s) = elf.section_by_index(SectionIndex(m.section_index())) {
                let name = s.name().unwrap_or_default().to_string();
                by_index.insert(s.index().0, name.clone());
                data_sections.entry(name).or_default();
            }
        }
    }
    for sym in elf.symbols() {
        let (Some(index), Ok(name)) = (sym.section_index(), sym.name()) else {
            continue;
        };
        if name.is_empty() || sym.kind() == SymbolKind::Section {
            continue;
        }
        if let Some(section) = by_index.get(&index.0) {
            if let Some(symbols) = data_sections.get_mut(section) {
                symbols.insert(name.to_string(), (sym.address(), sym.size()));
            }
        }
    }

    let mut out = Vec::new();
    match btf {
        Some(btf) => {
            for (section, symbols) in &data_sections {
                for var in object_btf::datasec_vars(btf, section) {
                    let (declared, type_name, type_size) = object_btf::describe(btf, var.type_id);
                    let (offset, size) = match symbols.get(var.name) {
                        Some(&(offset, size)) if size > 0 => (offset, size),
                        Some(&(offset, _)) => (offset, type_size.unwrap_or(0)),
                        None => (u64::from(var.offset), u64::from(var.size)),
                    };
                    out.push(GlobalInfo {
                        name: var.name.to_owned(),
                        section: section.clone(),
                        type_name,
                        declared,
                        size,
                        offset,
                    });
                }
            }
        }
        None => {
            for (section, symbols) in &data_sections {
                for (name, &(offset, size)) in symbols {
                    out.push(GlobalInfo {
                        name: name.clone(),
                        section: section.clone(),
                        type_name: "unknown".into(),
                        declared: "unknown".into(),
                        size,
                        offset,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.section, a.offset, &a.name).cmp(&(&b.section, b.offset, &b.name)));
    out
}

#[cfg(test)]
mod tests;
