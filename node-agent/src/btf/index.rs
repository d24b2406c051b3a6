//! The one pass over raw BTF: header and record checks, the offset of every type record,
//! and the sorted (name hash, type id) table that name queries search.

use std::ffi::CStr;

use super::*;

/// What one pass over the raw bytes finds.
pub(super) struct Index {
    pub(super) little_endian: bool,
    pub(super) strings: Range<usize>,
    pub(super) offsets: Vec<u32>,
    pub(super) names: Vec<u64>,
}

impl Index {
    /// Checks the header, the string section and every type record, and indexes the
    /// records by id and by name. The errors say what is wrong.
    pub(super) fn build(raw: &[u8]) -> Result<Index, String> {
        check_header(raw)?;
        let little_endian = u16::from_le_bytes([raw[0], raw[1]]) == BTF_MAGIC;
        let word = |at: usize| read_u32(raw, at, little_endian).map_or(0, |w| w as usize);
        let (version, flags) = (raw[2], raw[3]);
        if version != 1 {
            return Err(format!("unsupported BTF version {version}"));
        }
        if flags != 0 {
            return Err(format!("unsupported BTF flags {flags:#x}"));
        }
        let hdr_len = word(4);
        if hdr_len < BTF_HEADER_LEN {
            return Err(format!(
                "header length {hdr_len} is shorter than the {BTF_HEADER_LEN}-byte BTF header"
            ));
        }
        // check_header has checked these ranges against the length.
        let types = hdr_len + word(8)..hdr_len + word(8) + word(12);
        let strings = hdr_len + word(16)..hdr_len + word(16) + word(20);
        let str_section = &raw[strings.clone()];
        if str_section.first() != Some(&0) || str_section.last() != Some(&0) {
            return Err("the string section does not start and end with a NUL byte".to_string());
        }
        if let Err(e) = std::str::from_utf8(str_section) {
            return Err(format!("corrupt: invalid UTF-8 in the string section: {e}"));
        }

        let most = (types.end - types.start) / TYPE_HEADER_LEN;
        if most as u64 > ID_MASK {
            return Err(format!("more than {ID_MASK} types"));
        }
        let mut offsets = Vec::with_capacity(most);
        let mut names = Vec::with_capacity(most);
        let mut at = types.start;
        while at < types.end {
            let id = offsets.len() + 1;
            let (Some(name_off), Some(info)) = (
                read_u32(raw, at, little_endian),
                read_u32(raw, at + 4, little_endian),
            ) else {
                return Err(RUNS_PAST.to_string());
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let len = trailing_bytes(kind, vlen)
                .ok_or_else(|| format!("corrupt: unknown BTF kind {kind} (type id {id})"))?
                + TYPE_HEADER_LEN;
            if at + len > types.end {
                return Err(RUNS_PAST.to_string());
            }
            let start = name_off as usize;
            if start > 0 && str_section.get(start - 1) != Some(&0) {
                return Err(invalid_name(name_off, id));
            }
            let (hash, name_len) =
                hash_c_string(str_section, start).ok_or_else(|| invalid_name(name_off, id))?;
            if name_len > 0 && INDEXED_KINDS.contains(&kind) {
                names.push(name_key(hash, id as u32));
            }
            offsets.push(u32::try_from(at).map_err(|_| "too large".to_string())?);
            at += len;
        }
        names.sort_unstable();
        Ok(Index {
            little_endian,
            strings,
            offsets,
            names,
        })
    }
}

/// The kinds queries look up by name (a forward declaration never answers one).
const INDEXED_KINDS: [u32; 6] = [
    KIND_STRUCT,
    KIND_UNION,
    KIND_ENUM,
    KIND_ENUM64,
    KIND_TYPEDEF,
    KIND_FUNC,
];

fn invalid_name(name_off: u32, id: usize) -> String {
    format!("corrupt: invalid name offset {name_off} (type id {id})")
}

/// Inputs at least this large are hashed (SHA-256) on a second thread.
pub(super) const PARALLEL_HASH_BYTES: usize = 1 << 20;

/// The low bits of a name key hold the type id; the file size limit keeps ids
/// far below it (a record takes at least 12 bytes).
pub(super) const ID_MASK: u64 = (1 << 26) - 1;

/// A name index entry: the high bits of the name's hash, then the type id.
pub(super) fn name_key(hash: u64, id: u32) -> u64 {
    (hash & !ID_MASK) | u64::from(id)
}

const RUNS_PAST: &str = "truncated or corrupt: a type record runs past the end of its section";

pub(super) fn read_u32(raw: &[u8], at: usize, little_endian: bool) -> Option<u32> {
    let b: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little_endian {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

/// The NUL-terminated string at `off` of a string section, without the NUL; None
/// unless a string starts there.
pub(super) fn string_at(section: &[u8], off: u32) -> Option<&[u8]> {
    let off = usize::try_from(off).ok()?;
    if off > 0 && section.get(off - 1) != Some(&0) {
        return None;
    }
    CStr::from_bytes_until_nul(section.get(off..)?)
        .ok()
        .map(CStr::to_bytes)
}

const HASH_K: u64 = 0x517c_c1b7_2722_0a95;

fn hash_word(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(HASH_K)
}

/// A fast 64-bit hash of a name: 8 bytes at a time (the last word zero-padded),
/// then the length, with FxHash's constant. The index compares the names
/// themselves, so collisions only cost a comparison.
pub(super) fn name_hash(name: &[u8]) -> u64 {
    let mut h = 0;
    let mut chunks = name.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = hash_word(h, u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = hash_word(h, u64::from_le_bytes(w));
    }
    hash_word(h, name.len() as u64)
}

/// [`name_hash`] of the NUL-terminated string at `start` of `section`, and its
/// length, in one pass that finds the NUL a word at a time; None without a NUL.
pub(super) fn hash_c_string(section: &[u8], start: usize) -> Option<(u64, usize)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut h = 0;
    let mut at = start;
    loop {
        let Some(chunk) = section.get(at..at + 8) else {
            // Fewer than 8 bytes left: byte by byte.
            let rest = section.get(at..)?;
            let n = rest.iter().position(|&b| b == 0)?;
            if n > 0 {
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(&rest[..n]);
                h = hash_word(h, u64::from_le_bytes(w));
            }
            let len = at - start + n;
            return Some((hash_word(h, len as u64), len));
        };
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_le_bytes(w);
        // The lowest flagged byte is the first zero byte (flags above it may be false).
        let zero = w.wrapping_sub(ONES) & !w & HIGHS;
        if zero == 0 {
            h = hash_word(h, w);
            at += 8;
            continue;
        }
        let n = (zero.trailing_zeros() / 8) as usize;
        if n > 0 {
            h = hash_word(h, w & ((1u64 << (8 * n)) - 1));
        }
        let len = at - start + n;
        return Some((hash_word(h, len as u64), len));
    }
}

pub(super) const BTF_MAGIC: u16 = 0xeb9f;
const BTF_HEADER_LEN: usize = 24;

/// Checks the fixed BTF header against the file length before the records are
/// read, so a truncated or foreign file gets a message saying what it is (this
/// reads only the 24-byte `struct btf_header`).
pub(super) fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.starts_with(b"\x7fELF") {
        return Err(
            "this is an ELF file, not raw BTF; extract its .BTF section \
             (objcopy -O binary --only-section=.BTF FILE OUT)"
                .to_string(),
        );
    }
    if bytes.len() < BTF_HEADER_LEN {
        return Err(format!(
            "{} bytes is shorter than the {BTF_HEADER_LEN}-byte BTF header",
            bytes.len()
        ));
    }
    let le = u16::from_le_bytes([bytes[0], bytes[1]]) == BTF_MAGIC;
    let be = u16::from_be_bytes([bytes[0], bytes[1]]) == BTF_MAGIC;
    if !le && !be {
        return Err(format!(
            "bad magic {:#04x}{:02x} (expected 0xeb9f)",
            bytes[0], bytes[1]
        ));
    }
    let word = |at: usize| {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        u64::from(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (word(4), word(8), word(12), word(16), word(20));
    let needed = hdr_len + (type_off + type_len).max(str_off + str_len);
    if needed > bytes.len() as u64 {
        return Err(format!(
            "truncated: the header describes {needed} bytes, the file has {}",
            bytes.len()
        ));
    }
    Ok(())
}
