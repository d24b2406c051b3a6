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

mod object_btf;
use object::{Architecture, ObjectKind, ObjectSection, ObjectSymbol, SectionIndex, SymbolKind};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Default cap on an object file's size.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 << 20;
/// Most sections an object may have. Real objects have tens to a few hundred.
pub const MAX_SECTIONS: usize = 4096;
/// Largest section (`.bss` is allocated by the parser, whatever the file size).
const MAX_DATA_SECTION_BYTES: u64 = 64 << 20;

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

/// Why an object cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be read within its limit.
    #[error(transparent)]
    File(#[from] crate::capped::FileError),
    /// Zero bytes.
    #[error("empty file (0 bytes), not an eBPF object")]
    Empty,
    /// Not ELF at all.
    #[error("not an ELF file (no \\x7fELF magic), not an eBPF object")]
    NotElf,
    /// ELF, but broken.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// A valid ELF that is not an eBPF object.
    #[error("not an eBPF object: {0}")]
    NotBpf(String),
    /// Too many sections.
    #[error("too many sections: {count} (limit {MAX_SECTIONS})")]
    TooManySections {
        /// How many there are.
        count: usize,
    },
    /// The loader's parser refused it (it could not be loaded either).
    #[error("the loader cannot parse this object: {0}")]
    Loader(String),
    /// An extern the loader cannot resolve (named in the message).
    #[error("unresolvable extern: {}", .0.join("; "))]
    Extern(Vec<String>),
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

struct SectionFacts {
    name: String,
    size: u64,
}

/// Checks what `aya-obj` assumes: an eBPF relocatable object, bounded sizes,
/// readable section data and names, symbols inside their sections.
fn check_elf(elf: &object::File<'_>) -> Result<BTreeMap<usize, SectionFacts>, InspectError> {
    use object::Object as _;
    let arch = elf.architecture();
    if arch != Architecture::Bpf {
        return Err(InspectError::NotBpf(format!(
            "the ELF machine is {arch:?}, not BPF (compile with clang -target bpf)"
        )));
    }
    if elf.kind() != ObjectKind::Relocatable {
        return Err(InspectError::NotBpf(format!(
            "the ELF type is {:?}; eBPF objects are relocatable (.o)",
            elf.kind()
        )));
    }
    if elf.is_little_endian() != cfg!(target_endian = "little") {
        return Err(InspectError::NotBpf(
            "the object's byte order differs from this machine's (bpfel vs bpfeb)".to_string(),
        ));
    }
    let count = elf.sections().count();
    if count > MAX_SECTIONS {
        return Err(InspectError::TooManySections { count });
    }
    let mut sections = BTreeMap::new();
    for s in elf.sections() {
        let index = s.index().0;
        let name = s
            .name()
            .map_err(|e| InspectError::Malformed(format!("section {index}: name: {e}")))?;
        if s.address() != 0 {
            return Err(InspectError::Malformed(format!(
                "section {name} has address {:#x}; relocatable objects use 0",
                s.address()
            )));
        }
        // The parser allocates `.bss*` sections by their declared size.
        if s.size() > MAX_DATA_SECTION_BYTES {
            return Err(InspectError::Malformed(format!(
                "section {name} is {} bytes (limit {MAX_DATA_SECTION_BYTES})",
                s.size()
            )));
        }
        s.data()
            .map_err(|e| InspectError::Malformed(format!("section {name}: {e}")))?;
        for (_, reloc) in s.relocations() {
            if let object::RelocationTarget::Symbol(sym) = reloc.target() {
                elf.symbol_by_index(sym).map_err(|e| {
                    InspectError::Malformed(format!("section {name}: relocation target: {e}"))
                })?;
            }
        }
        sections.insert(
            index,
            SectionFacts {
                name: name.to_string(),
                size: s.size(),
            },
        );
    }
    for sym in elf.symbols() {
        let name = sym
            .name()
            .map_err(|e| InspectError::Malformed(format!("symbol {}: name: {e}", sym.index().0)))?;
        let Some(index) = sym.section_index() else {
            continue;
        };
        let section = sections.get(&index.0).ok_or_else(|| {
            InspectError::Malformed(format!(
                "symbol {name} refers to section {} which does not exist",
                index.0
            ))
        })?;
        let end = sym.address().checked_add(sym.size());
        if end.is_none_or(|end| end > section.size) {
            return Err(InspectError::Malformed(format!(
                "symbol {name} ({} bytes at {:#x}) runs past the end of section {} ({} bytes)",
                sym.size(),
                sym.address(),
                section.name,
                section.size
            )));
        }
    }
    if let (Some(btf), Some(ext)) = (section_data(elf, ".BTF"), section_data(elf, ".BTF.ext")) {
        check_btf_ext(btf, ext).map_err(|e| InspectError::Malformed(format!(".BTF.ext: {e}")))?;
    }
    check_call_relocations(elf).map_err(InspectError::Malformed)?;
    Ok(sections)
}

/// aya-obj 0.3 panics at load (`todo!`, or an unwrap) on a relocation in code whose symbol
/// is code (a function, or any symbol of an executable section) but neither a function in a
/// section nor a section symbol of a 32- or 64-bit relocation, e.g. a local label. Found by
/// the loader fuzz target.
fn check_call_relocations(elf: &object::File<'_>) -> Result<(), String> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    use object::{RelocationTarget, SectionKind, SymbolKind, SymbolSection};
    let is_text = |s: SymbolSection| match s {
        SymbolSection::Section(i) => elf
            .section_by_index(i)
            .is_ok_and(|s| s.kind() == SectionKind::Text),
        _ => false,
    };
    for section in elf.sections().filter(|s| s.kind() == SectionKind::Text) {
        for (offset, rel) in section.relocations() {
            let RelocationTarget::Symbol(index) = rel.target() else {
                continue;
            };
            let name = section.name().unwrap_or("?");
            let sym = elf.symbol_by_index(index).map_err(|e| {
                format!(
                    "{name}: the relocation at {offset:#x} refers to symbol {}: {e}",
                    index.0
                )
            })?;
            if sym.kind() != SymbolKind::Text && !is_text(sym.section()) {
                continue; // data: relocated as maps
            }
            let usable = match sym.kind() {
                SymbolKind::Text => sym.section_index().is_some(),
                SymbolKind::Section => matches!(rel.size(), 32 | 64),
                _ => false,
            };
            if !usable {
                return Err(format!(
                    "{name}: the relocation at {offset:#x} refers to code symbol {} ({:?}, {}-bit), which is neither a function nor a section",
                    sym.name().unwrap_or("?"),
                    sym.kind(),
                    rel.size()
                ));
            }
        }
    }
    Ok(())
}

fn section_data<'a>(elf: &object::File<'a>, name: &str) -> Option<&'a [u8]> {
    use object::Object as _;
    elf.section_by_name(name).and_then(|s| s.data().ok())
}

/// Checks what aya-obj 0.3 indexes in `.BTF.ext` without bounds checks (it
/// panics on them): record sizes, record counts, and the section-name string
/// offsets of the func/line info into the `.BTF` string table. Same reads as
/// the parser (headers in host byte order; the object's is the host's).
fn check_btf_ext(btf: &[u8], ext: &[u8]) -> Result<(), String> {
    let u32_at = |d: &[u8], at: usize| -> Option<u32> {
        let b = d.get(at..at.checked_add(4)?)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let word = |d: &[u8], at: usize| u32_at(d, at).map(|v| v as usize);
    // The .BTF string table (a malformed .BTF header is the parser's to report).
    let (Some(hdr_len), Some(str_off), Some(str_len)) =
        (word(btf, 4), word(btf, 16), word(btf, 20))
    else {
        return Ok(());
    };
    let strings = btf
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .unwrap_or_default();

    let ext_hdr_len = word(ext, 4).ok_or("header shorter than 8 bytes")?;
    if ext_hdr_len > ext.len() {
        return Err(format!("header length {ext_hdr_len} exceeds the section"));
    }
    // The parser copies the first `hdr_len` bytes (at most its 32-byte header) over a
    // zeroed header: a field cut by a short `hdr_len` keeps its low bytes, fields past it
    // read as zero. Read the fields from the same copy.
    let mut header = [0u8; 32];
    let copied = ext_hdr_len.min(header.len());
    header[..copied].copy_from_slice(&ext[..copied]);
    let field = |at: usize| word(&header, at).unwrap_or(0);
    // (offset field, length field, smallest record, records name a section)
    for (what, off_at, min_record, named) in [
        ("func_info", 8, 8, true),
        ("line_info", 16, 16, true),
        ("core_relo", 24, 16, false),
    ] {
        let (off, len) = (field(off_at), field(off_at + 4));
        if len == 0 {
            continue;
        }
        // The parser adds these as u32.
        let start = u32::try_from(ext_hdr_len)
            .ok()
            .and_then(|h| h.checked_add(u32::try_from(off).ok()?))
            .ok_or_else(|| {
                format!("{what} offset {off} after a {ext_hdr_len}-byte header overflows")
            })? as usize;
        let data = ext
            .get(start..start + len)
            .filter(|d| d.len() >= 4)
            .ok_or_else(|| format!("{what} ({len} bytes at {start}) runs past the section"))?;
        let record = word(data, 0).unwrap_or(0);
        if record < min_record {
            return Err(format!(
                "{what} record size {record} (at least {min_record})"
            ));
        }
        let data = &data[4..];
        let mut at = 0usize;
        while at + 8 < data.len() {
            let name_off = word(data, at).unwrap_or(0);
            let count = word(data, at + 4).unwrap_or(0);
            at += 8;
            let bytes = record
                .checked_mul(count)
                .filter(|b| at + b <= data.len())
                .ok_or_else(|| format!("{what}: {count} records of {record} bytes overflow"))?;
            if named
                && !strings
                    .get(name_off..)
                    .is_some_and(|rest| rest.contains(&0))
            {
                return Err(format!(
                    "{what}: section name offset {name_off} is not a string"
                ));
            }
            at += bytes;
        }
    }
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn non_objects_are_refused_with_the_reason() {
        assert!(matches!(inspect_bytes(b""), Err(InspectError::Empty)));
        assert!(matches!(
            inspect_bytes(b"#!/bin/sh\n"),
            Err(InspectError::NotElf)
        ));
        assert!(matches!(
            inspect_bytes(b"\x7fELF\x02\x01"),
            Err(InspectError::Malformed(_))
        ));
        if let Ok(bytes) = std::fs::read("/bin/true") {
            let err = inspect_bytes(&bytes).unwrap_err();
            assert!(matches!(err, InspectError::NotBpf(_)), "{err}");
            assert!(err.to_string().contains("X86_64"), "{err}");
        }
    }

    #[test]
    fn misaligned_input_is_copied_not_refused() {
        let obj = crate::builtin::builtin("packet-classifier-xdp").unwrap();
        let mut shifted = vec![0u8; obj.len() + 1];
        shifted[1..].copy_from_slice(obj);
        let a = inspect_bytes(obj).unwrap();
        let b = inspect_bytes(&shifted[1..]).unwrap();
        assert_eq!(a, b);
    }

    /// Random byte corruption and truncation of real objects (the built-ins, and
    /// libxdp's when installed): errors, never panics. `BPFPOLY_FUZZ_ITERS`
    /// raises the number of corruptions per object (default 300).
    #[test]
    fn corrupted_objects_never_panic() {
        let iters: usize = std::env::var("BPFPOLY_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let mut corpus: Vec<Vec<u8>> = crate::builtin::names()
            .iter()
            .map(|n| crate::builtin::builtin(n).unwrap().to_vec())
            .collect();
        if let Ok(dir) = std::fs::read_dir("/usr/lib/x86_64-linux-gnu/bpf") {
            for entry in dir.flatten() {
                if entry.path().extension().is_some_and(|e| e == "o") {
                    corpus.push(std::fs::read(entry.path()).unwrap());
                }
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for original in &corpus {
            assert!(inspect_bytes(original).is_ok());
            // Aim most corruptions at what the parsers read (ELF headers,
            // symbols, BTF, programs, maps), not at DWARF.
            use object::Object as _;
            let elf = object::File::parse(original.as_slice()).unwrap();
            let mut targets: Vec<(usize, usize)> = vec![(0, 64)];
            for section in elf.sections() {
                let name = section.name().unwrap_or("");
                if name.starts_with(".debug") || name.starts_with(".rel.debug") {
                    continue;
                }
                if let Some((start, len)) = section.file_range() {
                    if len > 0 {
                        targets.push((start as usize, len as usize));
                    }
                }
            }
            for _ in 0..iters {
                let mut bytes = original.clone();
                for _ in 0..(1 + next() % 8) {
                    let (start, len) = targets[(next() as usize) % targets.len()];
                    let at = (start + (next() as usize) % len).min(bytes.len() - 1);
                    bytes[at] = match next() % 4 {
                        0 => 0,
                        1 => 0xff,
                        _ => next() as u8,
                    };
                }
                let _ = inspect_bytes(&bytes);
            }
            for cut in (0..original.len()).step_by(97) {
                let _ = inspect_bytes(&original[..cut]);
            }
        }
    }
}
