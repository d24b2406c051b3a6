//! BTF mutations for the fuzz tests (included with `#[path]`): type records rewired into
//! loops, huge vlens, bad kinds; an object's `.BTF`, and queries that reach its types; and
//! the field-value primitives the object mutations use too.
#![allow(dead_code)]

use bpfpoly_crds::requirement::Query;
use object::{Object as _, ObjectSection as _};

use crate::fuzz_knobs::Rng;

// BTF.

/// A BTF type record: its id, byte offset in the blob, kind and vlen.
pub struct TypeRecord {
    pub id: u32,
    pub at: usize,
    pub kind: u32,
    pub vlen: usize,
}

/// Walks the type section of well-formed BTF (the seeds), little-endian.
pub fn btf_types(btf: &[u8]) -> Vec<TypeRecord> {
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
pub fn mutate_btf(rng: &mut Rng, btf: &mut [u8]) {
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
pub fn object_btf(bytes: &[u8]) -> Option<Vec<u8>> {
    let elf = object::File::parse(bytes).ok()?;
    Some(elf.section_by_name(".BTF")?.data().ok()?.to_vec())
}

/// Queries a BTF can answer, true and false ones: its struct/union names and members,
/// enums and enumerators, functions; and a few that are not there.
pub fn btf_queries(btf: &[u8]) -> Vec<Query> {
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

pub fn interesting(rng: &mut Rng, len: usize) -> u64 {
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

pub fn write_le(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    if at + width <= bytes.len() {
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
}
