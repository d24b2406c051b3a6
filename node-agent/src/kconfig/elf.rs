//! The object rewrite: `__kconfig` externs become globals of a `.rodata.kconfig`
//! section holding their values, and program sections that libbpf names but aya 0.14
//! does not parse (`tc`, `tc/ingress`, `tcx/egress`...) get a name aya reads
//! (`classifier/tc`...), in the ELF and in `.BTF.ext`, which finds a section's
//! function and line info and CO-RE relocations by name.
//!
//! Everything of the original file stays where it is; the new section's data, a
//! new `.BTF`, a new `.shstrtab` and a new section header table are appended, and
//! the ELF header points at the new table. In place, the externs' symbols are made
//! defined objects of the new section (offset, size), and in the BTF the `.kconfig`
//! DATASEC is renamed to the new section and sized, its entries get their offsets,
//! and the extern VARs become global ones (the kernel refuses extern linkage). The
//! code's relocations are unchanged: they name the same symbols, which aya now
//! relocates into the section's map like any `.rodata` global.

use super::btf_raw;
use super::model::{layout, Externs, RESOLVED_SECTION};

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

/// The name aya 0.14 parses for a program section libbpf names differently: the
/// kind aya knows, then the original name (so two sections never become one).
pub fn section_alias(name: &str) -> Option<String> {
    let kind = name.split('/').next().unwrap_or(name);
    match kind {
        "tc" | "tcx" | "netkit" => Some(format!("classifier/{name}")),
        _ => None,
    }
}

/// Whether an object needs `resolve`: it has externs, or a section to rename.
pub fn needs_rewrite(elf: &object::File<'_>, externs: &Externs) -> bool {
    use object::{Object as _, ObjectSection as _};
    !externs.is_empty()
        || elf
            .sections()
            .any(|s| s.name().ok().and_then(section_alias).is_some())
}

/// The object with `externs` resolved to `values` (one per extern, of its size) and
/// its program sections renamed where aya needs it. `bytes` is a little-endian ELF64
/// eBPF object (checked by `inspect` before).
pub fn resolve(bytes: &[u8], externs: &Externs, values: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    if values.len() != externs.kconfig.len() {
        return Err("one value per extern is needed".into());
    }
    rewrite(bytes, externs, values)
        .map_err(|what| format!("cannot rewrite the object for its __kconfig externs: {what}"))
}

/// The section headers of an ELF64 object, and the names in its `.shstrtab`.
struct Elf<'a> {
    bytes: &'a [u8],
    sections: Vec<Section>,
    shstrndx: usize,
    shstrtab: &'a [u8],
}

impl<'a> Elf<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.len() < EHDR || bytes[4] != 2 || bytes[5] != 1 {
            return Err("not a little-endian 64-bit ELF".into());
        }
        let header = |r: Option<u64>| r.map(|v| v as usize).ok_or("header");
        let shoff = header(u64_at(bytes, 0x28))?;
        let shentsize = header(u16_at(bytes, 0x3a).map(u64::from))?;
        let shnum = header(u16_at(bytes, 0x3c).map(u64::from))?;
        let shstrndx = header(u16_at(bytes, 0x3e).map(u64::from))?;
        if shentsize != SHDR || shnum == 0 || shnum + 1 >= SHN_LORESERVE || shstrndx >= shnum {
            return Err("unusual section header table".into());
        }
        let mut sections = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let h = shoff
                .checked_add(i * SHDR)
                .filter(|h| h + SHDR <= bytes.len())
                .ok_or("section headers out of bounds")?;
            let field = |at| u64_at(bytes, h + at).map(|v| v as usize);
            sections.push(Section {
                header: h,
                name: u32_at(bytes, h).unwrap_or(0),
                kind: u32_at(bytes, h + 4).unwrap_or(0),
                offset: field(0x18).unwrap_or(0),
                size: field(0x20).unwrap_or(0),
                entsize: field(0x38).unwrap_or(0),
            });
        }
        let shstrtab = data_of(bytes, &sections[shstrndx]).ok_or(".shstrtab out of bounds")?;
        Ok(Self {
            bytes,
            sections,
            shstrndx,
            shstrtab,
        })
    }

    fn data(&self, index: usize) -> Option<&'a [u8]> {
        data_of(self.bytes, &self.sections[index])
    }

    fn name_of(&self, s: &Section) -> Option<&'a str> {
        let tail = self.shstrtab.get(s.name as usize..)?;
        let len = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..len]).ok()
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.sections
            .iter()
            .position(|s| self.name_of(s) == Some(name))
    }

    /// The symbol table's offset and number of symbols.
    fn symtab(&self) -> Result<(usize, usize), String> {
        let symtab = self
            .sections
            .iter()
            .find(|s| s.kind == SHT_SYMTAB)
            .ok_or("no symbol table")?;
        if symtab.entsize != SYM || data_of(self.bytes, symtab).is_none() {
            return Err("unusual symbol table".into());
        }
        Ok((symtab.offset, symtab.size / SYM))
    }

    /// The sections to rename: (index, name, alias).
    fn renames(&self) -> Vec<(usize, String, String)> {
        self.sections
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let name = self.name_of(s)?;
                section_alias(name).map(|alias| (i, name.to_owned(), alias))
            })
            .collect()
    }
}

fn data_of<'a>(bytes: &'a [u8], s: &Section) -> Option<&'a [u8]> {
    s.offset
        .checked_add(s.size)
        .and_then(|end| bytes.get(s.offset..end))
}

/// A rewritten section: its index and its new content.
type Replaced = Option<(usize, Vec<u8>)>;

/// `resolve` with errors unprefixed.
fn rewrite(bytes: &[u8], externs: &Externs, values: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let elf = Elf::read(bytes)?;
    if elf.index_of(RESOLVED_SECTION).is_some() {
        return Err(format!("it already has a {RESOLVED_SECTION} section"));
    }
    let symtab = elf.symtab()?;
    let renames = elf.renames();
    let (places, data_size) = layout(externs)?;
    let (new_btf, new_ext) = patch_btf(&elf, externs, &places, data_size, &renames)?;
    let mut out = bytes.to_vec();
    define_symbols(&mut out, externs, &places, symtab, elf.sections.len())?;
    // Appended: the section's data, the BTF and BTF.ext, the section names, the headers.
    pad_to(&mut out, 8);
    let data_at = out.len();
    if !externs.is_empty() {
        out.extend_from_slice(&section_data(&places, data_size, values)?);
    }
    let mut moved: Vec<(usize, usize, usize)> = Vec::new();
    for (index, data) in new_btf.iter().chain(new_ext.iter()) {
        pad_to(&mut out, 8);
        moved.push((*index, out.len(), data.len()));
        out.extend_from_slice(data);
    }
    append_headers(
        &mut out,
        &elf,
        &renames,
        &moved,
        (!externs.is_empty()).then_some((data_at, data_size)),
    );
    Ok(out)
}

/// The `.BTF` with the `.kconfig` DATASEC renamed, sized and its entries placed, the
/// extern VARs made global, and the renamed sections' names appended; and the `.BTF.ext`
/// pointing at those names. Neither when there is nothing to change.
fn patch_btf(
    elf: &Elf<'_>,
    externs: &Externs,
    places: &[(u32, u32)],
    data_size: u32,
    renames: &[(usize, String, String)],
) -> Result<(Replaced, Replaced), String> {
    let kconfig = !externs.is_empty();
    let Some(btf_index) = elf
        .index_of(".BTF")
        .filter(|_| kconfig || !renames.is_empty())
    else {
        return if kconfig {
            Err("no .BTF section".into())
        } else {
            Ok((None, None))
        };
    };
    let old_btf = elf.data(btf_index).ok_or(".BTF out of bounds")?;
    let raw = btf_raw::RawBtf::parse(old_btf).map_err(|e| format!(".BTF: {e}"))?;
    if !raw.strings_last() {
        return Err(".BTF strings are not at its end".into());
    }
    let mut btf = old_btf.to_vec();
    let mut str_len = raw.str_len;
    let mut add_string = |btf: &mut Vec<u8>, s: &str| {
        let off = str_len as u32;
        btf.extend_from_slice(s.as_bytes());
        btf.push(0);
        str_len += s.len() + 1;
        off
    };
    if kconfig {
        let datasec = *raw
            .record(externs.datasec)
            .ok_or("the .kconfig DATASEC is gone")?;
        let var_records: Vec<usize> = externs
            .kconfig
            .iter()
            .map(|e| {
                btf_raw::u32_at(old_btf, btf_raw::datasec_entry(&datasec, e.entry))
                    .and_then(|id| raw.record(id))
                    .filter(|r| r.kind == btf_raw::kind::VAR)
                    .map(|r| r.at)
                    .ok_or("a .kconfig entry is gone")
            })
            .collect::<Result<_, _>>()?;
        let name_off = add_string(&mut btf, RESOLVED_SECTION);
        put_u32(&mut btf, datasec.at, name_off);
        put_u32(&mut btf, datasec.at + 8, data_size);
        for (e, ((offset, size), var_at)) in
            externs.kconfig.iter().zip(places.iter().zip(&var_records))
        {
            let entry = btf_raw::datasec_entry(&datasec, e.entry);
            put_u32(&mut btf, entry + 4, *offset);
            put_u32(&mut btf, entry + 8, *size);
            // The VAR's linkage word follows its 12-byte header.
            put_u32(&mut btf, var_at + 12, btf_raw::VAR_GLOBAL);
        }
    }
    let mut new_ext = None;
    if let Some(ext_index) = elf.index_of(".BTF.ext").filter(|_| !renames.is_empty()) {
        let old_ext = elf.data(ext_index).ok_or(".BTF.ext out of bounds")?;
        let mut ext = old_ext.to_vec();
        for (_, old, alias) in renames {
            let off = add_string(&mut btf, alias);
            rename_in_ext(&mut ext, &raw, old, off).map_err(|e| format!(".BTF.ext: {e}"))?;
        }
        new_ext = Some((ext_index, ext));
    }
    put_u32(&mut btf, 20, str_len as u32);
    Ok((Some((btf_index, btf)), new_ext))
}

/// The extern symbols, in place: defined global objects of the new section (index
/// `new_index`) at their offsets. `symtab` is the table's (offset, count).
fn define_symbols(
    out: &mut [u8],
    externs: &Externs,
    places: &[(u32, u32)],
    (symtab_offset, symtab_count): (usize, usize),
    new_index: usize,
) -> Result<(), String> {
    for (e, (offset, size)) in externs.kconfig.iter().zip(places) {
        if e.symbol >= symtab_count {
            return Err(format!("symbol of {} out of bounds", e.name));
        }
        let at = symtab_offset + e.symbol * SYM;
        out[at + 4] = GLOBAL_OBJECT;
        put_u16(out, at + 6, new_index as u16);
        put_u64(out, at + 8, u64::from(*offset));
        put_u64(out, at + 16, u64::from(*size));
    }
    Ok(())
}

/// The new section's content: each value at its place.
fn section_data(
    places: &[(u32, u32)],
    data_size: u32,
    values: &[Vec<u8>],
) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; data_size as usize];
    for ((offset, size), value) in places.iter().zip(values) {
        let (offset, size) = (*offset as usize, *size as usize);
        if value.len() != size {
            return Err("a value of the wrong size".into());
        }
        data[offset..offset + size].copy_from_slice(value);
    }
    Ok(data)
}

/// Appends the section names (the old ones, the new section's, the aliases) and the
/// section header table, pointed at what `moved` (index, offset, length) says and at the
/// new section when there is one (its data's offset and size), and points the ELF header
/// at the new table.
fn append_headers(
    out: &mut Vec<u8>,
    elf: &Elf<'_>,
    renames: &[(usize, String, String)],
    moved: &[(usize, usize, usize)],
    new_section: Option<(usize, u32)>,
) {
    let shstrtab_at = out.len();
    out.extend_from_slice(elf.shstrtab);
    let add_name = |out: &mut Vec<u8>, name: &str| {
        let off = (out.len() - shstrtab_at) as u32;
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        off
    };
    let new_section_name = add_name(out, RESOLVED_SECTION);
    let renamed: Vec<(usize, u32)> = renames
        .iter()
        .map(|(i, _, alias)| (*i, add_name(out, alias)))
        .collect();
    let shstrtab_len = out.len() - shstrtab_at;
    pad_to(out, 8);
    let headers_at = out.len();
    for s in &elf.sections {
        out.extend_from_slice(&elf.bytes[s.header..s.header + SHDR]);
    }
    let header = |i: usize| headers_at + i * SHDR;
    for &(index, at, len) in moved {
        put_u64(out, header(index) + 0x18, at as u64);
        put_u64(out, header(index) + 0x20, len as u64);
    }
    for (index, name) in renamed {
        put_u32(out, header(index), name);
    }
    put_u64(out, header(elf.shstrndx) + 0x18, shstrtab_at as u64);
    put_u64(out, header(elf.shstrndx) + 0x20, shstrtab_len as u64);
    let mut shnum_out = elf.sections.len();
    if let Some((data_at, data_size)) = new_section {
        let mut new = [0u8; SHDR];
        put_u32(&mut new, 0, new_section_name);
        put_u32(&mut new, 4, SHT_PROGBITS);
        put_u64(&mut new, 8, SHF_ALLOC);
        put_u64(&mut new, 0x18, data_at as u64);
        put_u64(&mut new, 0x20, u64::from(data_size));
        put_u64(&mut new, 0x30, 8);
        out.extend_from_slice(&new);
        shnum_out += 1;
    }
    put_u64(out, 0x28, headers_at as u64);
    put_u16(out, 0x3c, shnum_out as u16);
}

/// Points every `.BTF.ext` block (func info, line info, CO-RE relocations) of
/// section `old` at the string `new_off`.
fn rename_in_ext(
    ext: &mut [u8],
    btf: &btf_raw::RawBtf<'_>,
    old: &str,
    new_off: u32,
) -> Result<(), String> {
    if ext.len() < 24 || ext[..2] != [0x9f, 0xeb] {
        return Err("bad magic".into());
    }
    let word = |ext: &[u8], at: usize| u32_at(ext, at).map(|v| v as usize).ok_or("truncated");
    let hdr_len = word(ext, 4)?;
    let mut parts = vec![
        (word(ext, 8)?, word(ext, 12)?),
        (word(ext, 16)?, word(ext, 20)?),
    ];
    if hdr_len >= 32 {
        parts.push((word(ext, 24)?, word(ext, 28)?));
    }
    for (off, len) in parts {
        if len == 0 {
            continue;
        }
        let start = hdr_len.checked_add(off).ok_or("overflow")?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= ext.len())
            .ok_or("out of bounds")?;
        let rec_size = word(ext, start)?;
        if rec_size == 0 {
            return Err("zero record size".into());
        }
        let mut at = start + 4;
        while at + 8 <= end {
            let name_off = u32_at(ext, at).ok_or("truncated")?;
            let count = word(ext, at + 4)?;
            if btf.name(name_off) == Some(old) {
                put_u32(ext, at, new_off);
            }
            at = count
                .checked_mul(rec_size)
                .and_then(|n| n.checked_add(at + 8))
                .ok_or("overflow")?;
        }
    }
    Ok(())
}
