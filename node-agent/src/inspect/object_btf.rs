//! The object's own BTF, read in place over its raw records (`kconfig::btf_raw`, the
//! reader the `__kconfig` rewrite uses): the checks the loader's parser needs before it
//! runs, and the types of the data sections' globals.
//!
//! One walk over the records and no copies: a general BTF library caches every string
//! and every type first, which cost about a third of an inspection, on every fetch.

use crate::kconfig::btf_raw::{kind, u32_at, RawBtf, Record, INT_BOOL, INT_SIGNED};

/// Type chains (typedef → const → volatile → ...) longer than this are corrupt.
const MAX_TYPE_DEPTH: usize = 32;

/// Parses the object's `.BTF` and checks what aya-obj 0.3 takes on trust: the header
/// (version 1, no flags, sections in bounds), known kinds and record sizes, and every
/// name a type, member, enumerator or parameter refers to is a NUL-terminated string
/// of the string table (the parser slices the table with an unchecked offset). The
/// string table must be UTF-8: when the kernel refuses a name, its BTF log quotes it,
/// and aya 0.14 panics turning a log that is not UTF-8 into its error (found by the
/// loader fuzz target).
pub(super) fn parse(raw: &[u8]) -> Result<RawBtf<'_>, String> {
    let btf = RawBtf::parse(raw)?;
    let (version, flags) = (raw[2], raw[3]);
    if version != 1 {
        return Err(format!("unsupported BTF version {version}"));
    }
    if flags != 0 {
        return Err(format!("unsupported BTF flags {flags:#x}"));
    }
    let strings = btf.strings();
    if let Err(e) = std::str::from_utf8(strings) {
        return Err(format!(
            "the string table is not UTF-8 (at byte {})",
            e.valid_up_to()
        ));
    }
    let name_ok = |off: u32| {
        strings
            .get(off as usize..)
            .is_some_and(|tail| tail.contains(&0))
    };
    for (id, r) in btf.records.iter().enumerate().skip(1) {
        if !name_ok(r.name_off) {
            return Err(format!(
                "type {id}: its name: invalid string offset {}",
                r.name_off
            ));
        }
        // Kinds whose trailing entries start with a name: (entry size, what).
        let entries = match r.kind {
            kind::STRUCT | kind::UNION => Some((12, "member")),
            kind::ENUM => Some((8, "enumerator")),
            kind::ENUM64 => Some((12, "enumerator")),
            kind::FUNC_PROTO => Some((8, "parameter")),
            _ => None,
        };
        if let Some((size, what)) = entries {
            for n in 0..r.vlen {
                let off = u32_at(btf.bytes, r.at + 12 + n * size).unwrap_or(u32::MAX);
                if !name_ok(off) {
                    return Err(format!(
                        "type {id}: {what} name: invalid string offset {off}"
                    ));
                }
            }
        }
    }
    Ok(btf)
}

/// A variable of a DATASEC: its name, BTF type id, and (offset, size) from the entry.
pub(super) struct Var<'a> {
    pub name: &'a str,
    pub type_id: u32,
    pub offset: u32,
    pub size: u32,
}

/// The variables of every DATASEC named `section`, in entry order. Entries that are not
/// a named VAR are skipped.
pub(super) fn datasec_vars<'a>(btf: &RawBtf<'a>, section: &str) -> Vec<Var<'a>> {
    let mut out = Vec::new();
    for r in btf.records.iter().skip(1) {
        if r.kind != kind::DATASEC || btf.name(r.name_off) != Some(section) {
            continue;
        }
        for n in 0..r.vlen {
            let word = |i: usize| btf.extra(r, 3 * n + i);
            let (Some(var_id), Some(offset), Some(size)) = (word(0), word(1), word(2)) else {
                continue;
            };
            let Some(var) = btf.record(var_id).filter(|v| v.kind == kind::VAR) else {
                continue;
            };
            let Some(name) = btf.name(var.name_off) else {
                continue;
            };
            out.push(Var {
                name,
                type_id: var.size_or_type,
                offset,
                size,
            });
        }
    }
    out
}

/// `(declared, resolved, size)` of type `id`: the type as written (qualifiers and the
/// first typedef or base name), then what it is underneath typedefs and qualifiers.
pub(super) fn describe(btf: &RawBtf<'_>, mut id: u32) -> (String, String, Option<u64>) {
    let mut qualifiers: Vec<&str> = Vec::new();
    let mut declared_name: Option<String> = None;
    let mut record = None;
    for _ in 0..MAX_TYPE_DEPTH {
        let Some(r) = lookup(btf, id) else {
            return (
                join_declared(&qualifiers, "unknown"),
                "unknown".into(),
                None,
            );
        };
        record = Some(r);
        match r.kind {
            kind::CONST => qualifiers.push("const"),
            kind::VOLATILE => qualifiers.push("volatile"),
            kind::RESTRICT | kind::TYPE_TAG => {}
            kind::TYPEDEF => {
                if declared_name.is_none() {
                    declared_name = btf.name(r.name_off).map(str::to_owned);
                }
            }
            _ => break,
        }
        id = r.size_or_type;
        record = None;
    }
    let resolved = match record {
        Some(r) => resolve(btf, &r, 0),
        // 32 qualifiers deep: corrupt.
        None => Resolved::same("unknown".into(), None),
    };
    let name = declared_name.unwrap_or(resolved.c_name);
    (
        join_declared(&qualifiers, &name),
        resolved.kind,
        resolved.size,
    )
}

/// Type `id`'s record; id 0 is `void`.
fn lookup(btf: &RawBtf<'_>, id: u32) -> Option<Record> {
    if id == 0 {
        return Some(Record::VOID);
    }
    btf.record(id).copied()
}

fn join_declared(qualifiers: &[&str], name: &str) -> String {
    let mut parts = qualifiers.to_vec();
    parts.push(name);
    parts.join(" ")
}

/// A qualifier-free type: what it is, its size, and its C spelling.
struct Resolved {
    kind: String,
    size: Option<u64>,
    c_name: String,
}

impl Resolved {
    fn same(kind: String, size: Option<u64>) -> Self {
        Self {
            c_name: kind.clone(),
            kind,
            size,
        }
    }
}

fn resolve(btf: &RawBtf<'_>, r: &Record, depth: usize) -> Resolved {
    let named = |what: &str| match btf.name(r.name_off).unwrap_or_default() {
        "" => format!("{what} (anon)"),
        name => format!("{what} {name}"),
    };
    let size = u64::from(r.size_or_type);
    match r.kind {
        0 => Resolved::same("void".into(), None),
        kind::INT => {
            let encoding = btf.extra(r, 0).map_or(0, |v| (v >> 24) & 0x0f);
            let kind = if encoding & INT_BOOL != 0 {
                "bool".to_string()
            } else {
                let sign = if encoding & INT_SIGNED != 0 { "i" } else { "u" };
                format!("{sign}{}", size * 8)
            };
            Resolved {
                c_name: btf
                    .name(r.name_off)
                    .map_or_else(|| kind.clone(), str::to_owned),
                kind,
                size: Some(size),
            }
        }
        kind::ENUM | kind::ENUM64 => Resolved::same(named("enum"), Some(size)),
        kind::STRUCT => Resolved::same(named("struct"), Some(size)),
        kind::UNION => Resolved::same(named("union"), Some(size)),
        kind::FWD => Resolved::same(named(if r.kind_flag { "union" } else { "struct" }), None),
        kind::PTR => Resolved::same("pointer".into(), Some(8)),
        kind::FLOAT => Resolved {
            kind: format!("f{}", size * 8),
            size: Some(size),
            c_name: btf.name(r.name_off).unwrap_or_default().to_owned(),
        },
        kind::ARRAY if depth < MAX_TYPE_DEPTH => {
            let elem = btf
                .extra(r, 0)
                .and_then(|id| strip(btf, id))
                .map(|e| resolve(btf, &e, depth + 1))
                .unwrap_or_else(|| Resolved::same("unknown".into(), None));
            let len = u64::from(btf.extra(r, 2).unwrap_or(0));
            Resolved {
                kind: format!("{}[{len}]", elem.kind),
                size: elem.size.and_then(|s| s.checked_mul(len)),
                c_name: format!("{}[{len}]", elem.c_name),
            }
        }
        _ => Resolved::same("unknown".into(), None),
    }
}

/// Typedefs and qualifiers off: the record underneath, or the last one reached (a
/// reference out of range stops there; so do 32 levels).
fn strip(btf: &RawBtf<'_>, mut id: u32) -> Option<Record> {
    let mut last = lookup(btf, id)?;
    for _ in 0..MAX_TYPE_DEPTH {
        match last.kind {
            kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG | kind::TYPEDEF => {
                id = last.size_or_type;
                match lookup(btf, id) {
                    Some(next) => last = next,
                    None => return Some(last),
                }
            }
            _ => return Some(last),
        }
    }
    Some(last)
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _};

    /// A name that is not UTF-8 is refused offline (the crash input of the loader fuzz
    /// target had `__u\xff\xff\xff\xffnsigned int`).
    #[test]
    fn a_string_table_that_is_not_utf8_is_refused() {
        let obj = crate::builtin::builtin("packet-classifier-xdp").unwrap();
        let elf = object::File::parse(obj).unwrap();
        let (start, _) = elf.section_by_name(".BTF").unwrap().file_range().unwrap();
        let raw = elf.section_by_name(".BTF").unwrap().data().unwrap();
        let btf = super::parse(raw).unwrap();
        let at = start as usize + btf.hdr_len + btf.str_off + 1;
        let mut bad = obj.to_vec();
        bad[at] = 0xff;
        let err = crate::inspect::inspect_bytes(&bad).unwrap_err().to_string();
        assert!(err.contains(".BTF: the string table is not UTF-8"), "{err}");
    }
}
