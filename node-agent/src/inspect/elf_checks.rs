//! What `aya-obj` assumes of an object, checked before it parses it: an eBPF relocatable
//! ELF, bounded sizes, readable sections and names, symbols inside their sections, calls
//! that resolve, and a `.BTF.ext` whose offsets stay inside it.

use std::collections::BTreeMap;

use object::{Architecture, ObjectKind, ObjectSection, ObjectSymbol};

use super::error::{InspectError, MAX_SECTIONS};

/// Largest section (`.bss` is allocated by the parser, whatever the file size).
pub(super) const MAX_DATA_SECTION_BYTES: u64 = 64 << 20;

/// A section's name and size, by section index.
pub(super) struct SectionFacts {
    pub(super) name: String,
    pub(super) size: u64,
}

/// Checks what `aya-obj` assumes: an eBPF relocatable object, bounded sizes,
/// readable section data and names, symbols inside their sections.
pub(super) fn check_elf(
    elf: &object::File<'_>,
) -> Result<BTreeMap<usize, SectionFacts>, InspectError> {
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
pub(super) fn check_call_relocations(elf: &object::File<'_>) -> Result<(), String> {
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

pub(super) fn section_data<'a>(elf: &object::File<'a>, name: &str) -> Option<&'a [u8]> {
    use object::Object as _;
    elf.section_by_name(name).and_then(|s| s.data().ok())
}

/// Checks what aya-obj 0.3 indexes in `.BTF.ext` without bounds checks (it
/// panics on them): record sizes, record counts, and the section-name string
/// offsets of the func/line info into the `.BTF` string table. Same reads as
/// the parser (headers in host byte order; the object's is the host's).
pub(super) fn check_btf_ext(btf: &[u8], ext: &[u8]) -> Result<(), String> {
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
