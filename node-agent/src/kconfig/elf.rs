//! The object rewrite: `__kconfig` externs become globals of a `.rodata.kconfig`
//! section holding their values.
//!
//! Everything of the original file stays where it is; the new section's data, a
//! new `.BTF`, a new `.shstrtab` and a new section header table are appended, and
//! the ELF header points at the new table. In place, the externs' symbols are made
//! defined objects of the new section (offset, size), and in the BTF the `.kconfig`
//! DATASEC is renamed to the new section and sized, its entries get their offsets,
//! and the extern VARs become global ones (the kernel refuses extern linkage). The
//! code's relocations are unchanged: they name the same symbols, which aya now
//! relocates into the section's map like any `.rodata` global.

use super::{btf_raw, layout, Externs, RESOLVED_SECTION};

const EHDR: usize = 64;
const SHDR: usize = 64;
const SYM: usize = 24;
const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHF_ALLOC: u64 = 2;
/// `STB_GLOBAL << 4 | STT_OBJECT`.
const GLOBAL_OBJECT: u8 = 0x11;
/// Section indices from here on are reserved (extended numbering is not handled).
const SHN_LORESERVE: usize = 0xff00;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    btf_raw::u32_at(b, at)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

struct Section {
    /// Where its header is in the original file.
    header: usize,
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    entsize: usize,
}

fn pad_to(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
}

/// The object with `externs` resolved to `values` (one per extern, of its size).
/// `bytes` is a little-endian ELF64 eBPF object (checked by `inspect` before).
pub fn resolve(bytes: &[u8], externs: &Externs, values: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    if externs.is_empty() {
        return Ok(bytes.to_vec());
    }
    if values.len() != externs.kconfig.len() {
        return Err("one value per extern is needed".into());
    }
    let bad = |what: &str| format!("cannot rewrite the object for its __kconfig externs: {what}");
    if bytes.len() < EHDR || bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a little-endian 64-bit ELF"));
    }
    let shoff = u64_at(bytes, 0x28).ok_or_else(|| bad("header"))? as usize;
    let shentsize = u16_at(bytes, 0x3a).ok_or_else(|| bad("header"))? as usize;
    let shnum = u16_at(bytes, 0x3c).ok_or_else(|| bad("header"))? as usize;
    let shstrndx = u16_at(bytes, 0x3e).ok_or_else(|| bad("header"))? as usize;
    if shentsize != SHDR || shnum == 0 || shnum + 1 >= SHN_LORESERVE || shstrndx >= shnum {
        return Err(bad("unusual section header table"));
    }
    let mut sections = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = shoff
            .checked_add(i * SHDR)
            .filter(|h| h + SHDR <= bytes.len())
            .ok_or_else(|| bad("section headers out of bounds"))?;
        let field = |at| u64_at(bytes, h + at).map(|v| v as usize);
        let s = Section {
            header: h,
            name: u32_at(bytes, h).unwrap_or(0),
            kind: u32_at(bytes, h + 4).unwrap_or(0),
            offset: field(0x18).unwrap_or(0),
            size: field(0x20).unwrap_or(0),
            entsize: field(0x38).unwrap_or(0),
        };
        sections.push(s);
    }
    let data_of = |s: &Section| {
        s.offset
            .checked_add(s.size)
            .and_then(|end| bytes.get(s.offset..end))
    };
    let shstrtab = data_of(&sections[shstrndx]).ok_or_else(|| bad(".shstrtab out of bounds"))?;
    let name_of = |s: &Section| {
        let tail = shstrtab.get(s.name as usize..)?;
        let len = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..len]).ok()
    };
    if sections
        .iter()
        .any(|s| name_of(s) == Some(RESOLVED_SECTION))
    {
        return Err(bad(&format!("it already has a {RESOLVED_SECTION} section")));
    }
    let btf_index = sections
        .iter()
        .position(|s| name_of(s) == Some(".BTF"))
        .ok_or_else(|| bad("no .BTF section"))?;
    let symtab_index = sections
        .iter()
        .position(|s| s.kind == SHT_SYMTAB)
        .ok_or_else(|| bad("no symbol table"))?;
    let symtab = &sections[symtab_index];
    if symtab.entsize != SYM || data_of(symtab).is_none() {
        return Err(bad("unusual symbol table"));
    }
    let symtab_offset = symtab.offset;
    let symtab_count = symtab.size / SYM;

    let (places, data_size) = layout(externs);
    let new_index = shnum;

    // The new BTF: the original, patched, with the section name appended to its strings.
    let old_btf = data_of(&sections[btf_index]).ok_or_else(|| bad(".BTF out of bounds"))?;
    let raw = btf_raw::RawBtf::parse(old_btf).map_err(|e| bad(&format!(".BTF: {e}")))?;
    if !raw.strings_last() {
        return Err(bad(".BTF strings are not at its end"));
    }
    let datasec = *raw
        .record(externs.datasec)
        .ok_or_else(|| bad("the .kconfig DATASEC is gone"))?;
    let new_name_off = raw.str_len as u32;
    let var_records: Vec<usize> = externs
        .kconfig
        .iter()
        .map(|e| {
            btf_raw::u32_at(old_btf, btf_raw::datasec_entry(&datasec, e.entry))
                .and_then(|id| raw.record(id))
                .map(|r| r.at)
                .ok_or_else(|| bad("a .kconfig entry is gone"))
        })
        .collect::<Result<_, _>>()?;
    let mut btf = old_btf.to_vec();
    btf.extend_from_slice(RESOLVED_SECTION.as_bytes());
    btf.push(0);
    put_u32(
        &mut btf,
        20,
        (raw.str_len + RESOLVED_SECTION.len() + 1) as u32,
    );
    put_u32(&mut btf, datasec.at, new_name_off);
    put_u32(&mut btf, datasec.at + 8, data_size);
    for (e, ((offset, size), var_at)) in externs.kconfig.iter().zip(places.iter().zip(&var_records))
    {
        let entry = btf_raw::datasec_entry(&datasec, e.entry);
        put_u32(&mut btf, entry + 4, *offset);
        put_u32(&mut btf, entry + 8, *size);
        // The VAR's linkage word follows its 12-byte header.
        put_u32(&mut btf, var_at + 12, btf_raw::VAR_GLOBAL);
    }

    let mut out = bytes.to_vec();
    // The symbols, in place.
    for (e, (offset, size)) in externs.kconfig.iter().zip(&places) {
        if e.symbol >= symtab_count {
            return Err(bad(&format!("symbol of {} out of bounds", e.name)));
        }
        let at = symtab_offset + e.symbol * SYM;
        out[at + 4] = GLOBAL_OBJECT;
        put_u16(&mut out, at + 6, new_index as u16);
        put_u64(&mut out, at + 8, u64::from(*offset));
        put_u64(&mut out, at + 16, u64::from(*size));
    }

    // Appended: the section's data, the BTF, the section names, the headers.
    pad_to(&mut out, 8);
    let data_at = out.len();
    let mut data = vec![0u8; data_size as usize];
    for ((offset, size), value) in places.iter().zip(values) {
        let (offset, size) = (*offset as usize, *size as usize);
        if value.len() != size {
            return Err(bad("a value of the wrong size"));
        }
        data[offset..offset + size].copy_from_slice(value);
    }
    out.extend_from_slice(&data);
    pad_to(&mut out, 8);
    let btf_at = out.len();
    out.extend_from_slice(&btf);
    let shstrtab_at = out.len();
    let new_section_name = shstrtab.len() as u32;
    out.extend_from_slice(shstrtab);
    out.extend_from_slice(RESOLVED_SECTION.as_bytes());
    out.push(0);
    let shstrtab_len = out.len() - shstrtab_at;
    pad_to(&mut out, 8);
    let headers_at = out.len();
    for s in &sections {
        out.extend_from_slice(&bytes[s.header..s.header + SHDR]);
    }
    let header = |i: usize| headers_at + i * SHDR;
    put_u64(&mut out, header(btf_index) + 0x18, btf_at as u64);
    put_u64(&mut out, header(btf_index) + 0x20, btf.len() as u64);
    put_u64(&mut out, header(shstrndx) + 0x18, shstrtab_at as u64);
    put_u64(&mut out, header(shstrndx) + 0x20, shstrtab_len as u64);
    let mut new = [0u8; SHDR];
    put_u32(&mut new, 0, new_section_name);
    put_u32(&mut new, 4, SHT_PROGBITS);
    put_u64(&mut new, 8, SHF_ALLOC);
    put_u64(&mut new, 0x18, data_at as u64);
    put_u64(&mut new, 0x20, u64::from(data_size));
    put_u64(&mut new, 0x30, 8);
    out.extend_from_slice(&new);
    put_u64(&mut out, 0x28, headers_at as u64);
    put_u16(&mut out, 0x3c, (shnum + 1) as u16);
    Ok(out)
}
