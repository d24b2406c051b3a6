//! Kernel BTF: read once, hashed once, and indexed in one pass over the raw bytes:
//! the offset of every type record and a sorted (name hash, type id) table. Queries
//! by name (`type:`, `field:`, `enum:`, `func:` of `BpfNodeProfile.spec.queries`)
//! read the records they need straight from the bytes; nothing else is decoded.
//!
//! The file is untrusted input (`--btf-path` may name anything): its size is
//! capped before it is read, every record is bounds-checked while indexing, every
//! read after that is checked again, and every failure is an error naming the file.

use std::{
    collections::HashSet,
    ffi::CStr,
    fs::File,
    io::{self, Read},
    ops::Range,
    path::{Path, PathBuf},
};

use bpfpoly_crds::requirement::Query;
use sha2::{Digest, Sha256};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Default cap on the BTF file size. Real vmlinux BTF is 5–10 MiB.
pub const DEFAULT_MAX_BTF_BYTES: u64 = 64 << 20;

/// Longest qualifier chain followed; real BTF has two or three.
const MAX_MODIFIERS: usize = 32;

/// Why BTF could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be opened or read.
    #[error("cannot read BTF file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is empty.
    #[error("BTF file {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than the limit.
    #[error("BTF file {} is larger than the limit of {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// The content is not valid BTF.
    #[error("{} is not valid BTF: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

// BTF kinds (`BTF_KIND_*` of include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// `struct btf_type`: name_off, info, size/type.
const TYPE_HEADER_LEN: usize = 12;

/// Bytes that follow the 12-byte record of `kind` with `vlen` members; None for a
/// kind this agent does not know.
fn trailing_bytes(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        _ => return None,
    })
}

/// One type record, as indexed.
#[derive(Clone, Copy, Debug)]
struct Record {
    name_off: u32,
    kind: u32,
    vlen: usize,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Where the members (or other trailing data) start in the file.
    members: usize,
}

/// Parsed kernel BTF with its digest, ready to answer queries.
pub struct KernelBtf {
    raw: Vec<u8>,
    little_endian: bool,
    /// The string section in `raw`.
    strings: Range<usize>,
    /// Offset in `raw` of type id `i + 1`'s record.
    offsets: Vec<u32>,
    /// Every named type of the kinds queries name (`INDEXED_KINDS`) as
    /// `name_key(hash of the name, type id)`, sorted: by hash, then by id.
    names: Vec<u64>,
    source: PathBuf,
    sha256: String,
    type_count: u32,
}

impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBtf")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .field("type_count", &self.type_count)
            .finish_non_exhaustive()
    }
}

impl KernelBtf {
    /// Loads raw BTF (e.g. `/sys/kernel/btf/vmlinux`) with the default size limit.
    pub fn load(path: &Path) -> Result<KernelBtf, BtfError> {
        Self::load_with_limit(path, DEFAULT_MAX_BTF_BYTES)
    }

    /// Loads raw BTF, refusing files larger than `max_bytes`.
    pub fn load_with_limit(path: &Path, max_bytes: u64) -> Result<KernelBtf, BtfError> {
        let bytes = read_capped(path, max_bytes)?;
        Self::from_vec(bytes, path)
    }

    /// Parses raw BTF already in memory; `source` names it in errors and status.
    #[allow(dead_code)] // The tests parse BTF in memory; the agent reads files.
    pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<KernelBtf, BtfError> {
        Self::from_vec(bytes.to_vec(), source)
    }

    fn from_vec(raw: Vec<u8>, source: &Path) -> Result<KernelBtf, BtfError> {
        if raw.is_empty() {
            return Err(BtfError::Empty {
                path: source.to_path_buf(),
            });
        }
        // Hashing takes a third of the time of indexing: for real kernel BTF it runs
        // on a thread of its own meanwhile.
        let (index, sha256) = if raw.len() >= PARALLEL_HASH_BYTES {
            std::thread::scope(|s| {
                let sha = s.spawn(|| hex::encode(Sha256::digest(&raw)));
                let index = Index::build(&raw);
                let sha = sha
                    .join()
                    .unwrap_or_else(|_| hex::encode(Sha256::digest(&raw)));
                (index, sha)
            })
        } else {
            (Index::build(&raw), hex::encode(Sha256::digest(&raw)))
        };
        let index = index.map_err(|reason| BtfError::Malformed {
            path: source.to_path_buf(),
            reason,
        })?;
        let type_count = u32::try_from(index.offsets.len()).unwrap_or(u32::MAX);
        Ok(KernelBtf {
            raw,
            little_endian: index.little_endian,
            strings: index.strings,
            offsets: index.offsets,
            names: index.names,
            source: source.to_path_buf(),
            sha256,
            type_count,
        })
    }

    /// Where the BTF was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// SHA-256 of the raw BTF bytes, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Number of types (ids 1..=N; `void` is not counted), as `bpftool` reports.
    pub fn type_count(&self) -> u32 {
        self.type_count
    }

    /// Answers a BTF query; `None` for queries BTF cannot answer (`helper:`).
    pub fn answer(&self, query: &Query) -> Option<bool> {
        match query {
            Query::Type(t) => {
                let (kind, name) = split_kind(t)?;
                Some(self.has_type(kind, name))
            }
            Query::Field(f) => {
                let (ty, field) = f.rsplit_once('.')?;
                let (kind, name) = split_kind(ty)?;
                Some(self.has_field(kind, name, field))
            }
            Query::Enum(e) => {
                let (ty, value) = e.rsplit_once('.')?;
                let (_, name) = split_kind(ty)?;
                Some(self.has_enum_value(name, value))
            }
            Query::Func(name) => Some(self.has_func(name)),
            Query::Helper { .. } => None,
        }
    }

    /// A defined `struct`/`union`/`enum`/`typedef` named `name` exists. A forward
    /// declaration does not count: nothing can be read through it. `enum` covers
    /// both BTF kinds ENUM and ENUM64.
    pub fn has_type(&self, kind: &str, name: &str) -> bool {
        self.types_named(name)
            .any(|(_, r)| kind_matches(kind, r.kind))
    }

    /// The struct/union `name` has a member `field`, directly or inside an
    /// anonymous struct/union member (as C lets you write `t->field`).
    pub fn has_field(&self, kind: &str, name: &str, field: &str) -> bool {
        let mut seen = HashSet::new();
        self.types_named(name)
            .filter(|(_, r)| kind_matches(kind, r.kind))
            .any(|(_, r)| self.composite_has_member(r, field, &mut seen))
    }

    /// The enum (ENUM or ENUM64) `name` has the enumerator `value`.
    pub fn has_enum_value(&self, name: &str, value: &str) -> bool {
        self.types_named(name).any(|(_, r)| {
            let member_len = match r.kind {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => return false,
            };
            (0..r.vlen).any(|i| {
                self.u32_at(r.members + i * member_len)
                    .and_then(|off| self.name_at(off))
                    .is_some_and(|n| n == value.as_bytes())
            })
        })
    }

    /// A BTF FUNC named `name` exists (a kernel function: fentry target, kfunc).
    pub fn has_func(&self, name: &str) -> bool {
        self.func_id(name).is_some()
    }

    /// The id of the first BTF FUNC named `name` (an attach target's `attach_btf_id`).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types_named(name)
            .find(|(_, r)| r.kind == KIND_FUNC)
            .map(|(id, _)| id)
    }

    /// Types of the `INDEXED_KINDS` named `name`, in id order.
    fn types_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (u32, Record)> + 'a {
        let lowest = name_key(name_hash(name.as_bytes()), 0);
        let first = if name.is_empty() {
            self.names.len()
        } else {
            self.names.partition_point(|&k| k < lowest)
        };
        self.names[first..]
            .iter()
            .take_while(move |&&k| k & !ID_MASK == lowest)
            .filter_map(move |&k| {
                let id = (k & ID_MASK) as u32;
                let r = self.record(id)?;
                (self.name_at(r.name_off)? == name.as_bytes()).then_some((id, r))
            })
    }

    /// The record of type `id` (None for `void`, id 0, and ids out of range).
    fn record(&self, id: u32) -> Option<Record> {
        let at = *self
            .offsets
            .get(usize::try_from(id).ok()?.checked_sub(1)?)? as usize;
        let info = self.u32_at(at + 4)?;
        Some(Record {
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            size_or_type: self.u32_at(at + 8)?,
            members: at + TYPE_HEADER_LEN,
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        read_u32(&self.raw, at, self.little_endian)
    }

    /// The string at `off` in the string section, without its NUL; None unless `off`
    /// is where a string starts.
    fn name_at(&self, off: u32) -> Option<&[u8]> {
        string_at(&self.raw[self.strings.clone()], off)
    }

    /// Looks through anonymous members; `seen` holds the anonymous types already
    /// searched, so hostile BTF with cycles or shared members stays linear. Iterative:
    /// a hostile chain of nested anonymous members cannot exhaust the stack.
    fn composite_has_member(&self, root: Record, field: &str, seen: &mut HashSet<u32>) -> bool {
        let mut pending = vec![root];
        while let Some(ty) = pending.pop() {
            if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            for i in 0..ty.vlen {
                let at = ty.members + i * 12;
                let Some(name) = self.u32_at(at).and_then(|off| self.name_at(off)) else {
                    continue;
                };
                if name == field.as_bytes() {
                    return true;
                }
                if name.is_empty() {
                    if let Some((id, inner)) =
                        self.u32_at(at + 4).and_then(|t| self.strip_modifiers(t))
                    {
                        if seen.insert(id) {
                            pending.push(inner);
                        }
                    }
                }
            }
        }
        false
    }

    /// Follows const/volatile/restrict/type-tag from type `id` to the type they
    /// qualify; returns its id and record.
    fn strip_modifiers(&self, mut id: u32) -> Option<(u32, Record)> {
        for _ in 0..MAX_MODIFIERS {
            let r = self.record(id)?;
            match r.kind {
                KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => id = r.size_or_type,
                _ => return Some((id, r)),
            }
        }
        None
    }
}

/// What one pass over the raw bytes finds.
struct Index {
    little_endian: bool,
    strings: Range<usize>,
    offsets: Vec<u32>,
    names: Vec<u64>,
}

impl Index {
    /// Checks the header, the string section and every type record, and indexes the
    /// records by id and by name. The errors say what is wrong.
    fn build(raw: &[u8]) -> Result<Index, String> {
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
const PARALLEL_HASH_BYTES: usize = 1 << 20;

/// The low bits of a name key hold the type id; the file size limit keeps ids
/// far below it (a record takes at least 12 bytes).
const ID_MASK: u64 = (1 << 26) - 1;

/// A name index entry: the high bits of the name's hash, then the type id.
fn name_key(hash: u64, id: u32) -> u64 {
    (hash & !ID_MASK) | u64::from(id)
}

const RUNS_PAST: &str = "truncated or corrupt: a type record runs past the end of its section";

fn read_u32(raw: &[u8], at: usize, little_endian: bool) -> Option<u32> {
    let b: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little_endian {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

/// The NUL-terminated string at `off` of a string section, without the NUL; None
/// unless a string starts there.
fn string_at(section: &[u8], off: u32) -> Option<&[u8]> {
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
fn name_hash(name: &[u8]) -> u64 {
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
fn hash_c_string(section: &[u8], start: usize) -> Option<(u64, usize)> {
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

fn split_kind(s: &str) -> Option<(&str, &str)> {
    s.split_once(' ').map(|(k, n)| (k, n.trim()))
}

fn kind_matches(kind: &str, btf_kind: u32) -> bool {
    matches!(
        (kind, btf_kind),
        ("struct", KIND_STRUCT)
            | ("union", KIND_UNION)
            | ("enum", KIND_ENUM | KIND_ENUM64)
            | ("typedef", KIND_TYPEDEF)
    )
}

/// Reads at most `max_bytes` (+1 to detect overflow) from `path`. The size is
/// checked while reading: sysfs files report sizes that may not be exact.
fn read_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>, BtfError> {
    let read_err = |source| BtfError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(io::Error::other("is a directory")));
    }
    if meta.len() > max_bytes {
        return Err(BtfError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(BtfError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_HEADER_LEN: usize = 24;

/// Checks the fixed BTF header against the file length before the records are
/// read, so a truncated or foreign file gets a message saying what it is (this
/// reads only the 24-byte `struct btf_header`).
fn check_header(bytes: &[u8]) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vmlinux() -> Option<Vec<u8>> {
        std::fs::read(VMLINUX_BTF).ok()
    }

    #[test]
    fn header_checks_name_the_problem() {
        assert!(check_header(b"").unwrap_err().contains("shorter"));
        assert!(
            check_header(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0")
                .unwrap_err()
                .contains("ELF")
        );
        assert!(check_header(&[0u8; 64]).unwrap_err().contains("magic"));
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for w in [24u32, 0, 100, 100, 10] {
            hdr.extend_from_slice(&w.to_le_bytes());
        }
        assert!(check_header(&hdr).unwrap_err().contains("truncated"));
    }

    #[test]
    fn empty_input_is_an_error() {
        let err = KernelBtf::from_bytes(b"", Path::new("/x")).unwrap_err();
        assert!(matches!(err, BtfError::Empty { .. }), "{err}");
    }

    /// Every prefix and many corruptions of real BTF (the built-in objects'
    /// `.BTF`, whole and consistent) are errors or parse, never panics.
    #[test]
    fn truncated_and_corrupted_btf_never_panics() {
        use object::{Object as _, ObjectSection as _};
        let mut corpus = Vec::new();
        for name in crate::builtin::names() {
            let obj = object::File::parse(crate::builtin::builtin(name).unwrap()).unwrap();
            let btf = obj
                .section_by_name(".BTF")
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            assert!(KernelBtf::from_bytes(&btf, Path::new(name)).is_ok());
            corpus.push(btf);
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for raw in &corpus {
            for cut in (0..raw.len()).step_by(13) {
                assert!(KernelBtf::from_bytes(&raw[..cut], Path::new("cut")).is_err());
            }
            for _ in 0..500 {
                let mut bytes = raw.clone();
                for _ in 0..(1 + next() % 6) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
                if let Ok(btf) = KernelBtf::from_bytes(&bytes, Path::new("fuzz")) {
                    // Queries on corrupt-but-parsable BTF must not panic either.
                    for q in [
                        "type:struct bpfpoly_event",
                        "field:struct bpfpoly_event.pid",
                        "enum:enum bpf_map_type.BPF_MAP_TYPE_ARRAY",
                        "func:on_exec",
                    ] {
                        let _ = btf.answer(&Query::parse(q).unwrap());
                    }
                }
            }
        }
    }

    /// A small BTF written by hand, in either byte order.
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                count: 0,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        /// Appends a type; `trailing` are the words after the 12-byte record.
        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            size_or_type: u32,
            trailing: &[u32],
        ) -> u32 {
            let name_off = self.name(name);
            self.types
                .extend([name_off, (kind << 24) | vlen, size_or_type]);
            self.types.extend_from_slice(trailing);
            self.count += 1;
            self.count
        }

        fn bytes(&self, little_endian: bool) -> Vec<u8> {
            let word = |w: u32| {
                if little_endian {
                    w.to_le_bytes()
                } else {
                    w.to_be_bytes()
                }
            };
            let type_len = self.types.len() as u32 * 4;
            let mut out = Vec::new();
            out.extend_from_slice(&if little_endian {
                BTF_MAGIC.to_le_bytes()
            } else {
                BTF_MAGIC.to_be_bytes()
            });
            out.extend_from_slice(&[1, 0]);
            for w in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend_from_slice(&word(w));
            }
            for w in &self.types {
                out.extend_from_slice(&word(*w));
            }
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// struct outer { int a; union { struct { int deep; }; }; const struct { int
    /// in_inner; }; struct named { int hidden; } n; }; plus an enum, an enum64, a
    /// forward declaration, a typedef and a function.
    fn sample() -> Builder {
        let mut b = Builder::new();
        let int = b.ty("int", KIND_INT, 0, 4, &[32]);
        let deep = b.name("deep");
        let anon_struct = b.ty("", KIND_STRUCT, 1, 4, &[deep, int, 0]);
        let anon_union = b.ty("", KIND_UNION, 1, 4, &[0, anon_struct, 0]);
        let inner_field = b.name("in_inner");
        let inner = b.ty("", KIND_STRUCT, 1, 4, &[inner_field, int, 0]);
        let konst = b.ty("", KIND_CONST, 0, inner, &[]);
        let hidden = b.name("hidden");
        let named = b.ty("named", KIND_STRUCT, 1, 4, &[hidden, int, 0]);
        let (a, n) = (b.name("a"), b.name("n"));
        b.ty(
            "outer",
            KIND_STRUCT,
            4,
            16,
            &[a, int, 0, 0, anon_union, 32, 0, konst, 64, n, named, 96],
        );
        let (one, two) = (b.name("ONE"), b.name("TWO"));
        b.ty("numbers", KIND_ENUM, 2, 4, &[one, 1, two, 2]);
        let big = b.name("BIG");
        b.ty("wide", KIND_ENUM64, 1, 8, &[big, 0, 1]);
        b.ty("only_declared", KIND_FWD, 0, 0, &[]);
        b.ty("u32_t", KIND_TYPEDEF, 0, int, &[]);
        let proto = b.ty("", KIND_FUNC_PROTO, 0, int, &[]);
        b.ty("do_work", KIND_FUNC, 0, proto, &[]);
        b
    }

    /// The index hashes names in the string section as it finds their NUL; a query
    /// hashes the name it is given: both must agree for every length and wherever
    /// the string ends (mid-word, on a word boundary, at the end of the section).
    #[test]
    fn string_section_hashes_match_query_hashes() {
        for len in 0..40 {
            let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for pad in 0..10 {
                let mut section = vec![b'x'; pad];
                section.push(0);
                let start = section.len();
                section.extend_from_slice(&name);
                section.push(0);
                for tail in [0, 1, 7, 8, 9] {
                    let mut s = section.clone();
                    s.extend(std::iter::repeat_n(b'y', tail));
                    assert_eq!(
                        hash_c_string(&s, start),
                        Some((name_hash(&name), len)),
                        "len {len}, pad {pad}, tail {tail}"
                    );
                }
            }
            // No NUL: no string.
            assert_eq!(hash_c_string(&name, 0), None, "len {len}");
        }
        assert_ne!(name_hash(b"task_struct"), name_hash(b"task_struct\0"));
        assert_ne!(name_hash(b""), name_hash(b"\0"));
    }

    #[test]
    fn answers_on_hand_written_btf_in_both_byte_orders() {
        let b = sample();
        for little_endian in [true, false] {
            let btf = KernelBtf::from_bytes(&b.bytes(little_endian), Path::new("s")).unwrap();
            let q = |s: &str| btf.answer(&Query::parse(s).unwrap());
            let order = if little_endian { "LE" } else { "BE" };
            assert_eq!(btf.type_count(), b.count, "{order}");
            assert_eq!(q("type:struct outer"), Some(true), "{order}");
            assert_eq!(q("type:union outer"), Some(false), "{order}");
            assert_eq!(q("field:struct outer.a"), Some(true), "{order}");
            // Through an anonymous union and an anonymous struct.
            assert_eq!(q("field:struct outer.deep"), Some(true), "{order}");
            // Through an anonymous const struct.
            assert_eq!(q("field:struct outer.in_inner"), Some(true), "{order}");
            // A named member's own members are not the struct's.
            assert_eq!(q("field:struct outer.hidden"), Some(false), "{order}");
            assert_eq!(q("field:struct outer.n"), Some(true), "{order}");
            assert_eq!(q("field:struct outer.nope"), Some(false), "{order}");
            assert_eq!(q("enum:enum numbers.TWO"), Some(true), "{order}");
            assert_eq!(q("enum:enum numbers.THREE"), Some(false), "{order}");
            assert_eq!(q("enum:enum wide.BIG"), Some(true), "{order}");
            assert_eq!(q("type:enum wide"), Some(true), "{order}");
            assert_eq!(q("type:struct only_declared"), Some(false), "{order}");
            assert_eq!(q("type:typedef u32_t"), Some(true), "{order}");
            assert_eq!(q("func:do_work"), Some(true), "{order}");
            assert_eq!(q("func:outer"), Some(false), "{order}");
            assert_eq!(btf.func_id("do_work"), Some(b.count), "{order}");
            assert_eq!(btf.func_id("u32_t"), None, "{order}");
        }
    }

    #[test]
    fn record_and_string_errors_are_reported() {
        let good = sample().bytes(true);
        let parse = |bytes: &[u8]| KernelBtf::from_bytes(bytes, Path::new("x")).map(|_| ());
        assert!(parse(&good).is_ok());

        // Kind 31 in the first record.
        let mut bad = good.clone();
        bad[24 + 7] = 0x1f;
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown BTF kind 31"), "{e}");

        // A name offset in the middle of a string ("nt" of "int").
        let mut bad = good.clone();
        bad[24..28].copy_from_slice(&2u32.to_le_bytes());
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("invalid name offset 2"), "{e}");

        // A struct whose members run past the type section.
        let mut b = Builder::new();
        b.ty("s", KIND_STRUCT, 5, 4, &[0, 0, 0]);
        let e = parse(&b.bytes(true)).unwrap_err().to_string();
        assert!(e.contains("runs past the end"), "{e}");

        // Version 2, flags, invalid UTF-8.
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(parse(&bad).unwrap_err().to_string().contains("version 2"));
        let mut bad = good.clone();
        bad[3] = 1;
        assert!(parse(&bad).unwrap_err().to_string().contains("flags"));
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] = 0xff;
        assert!(parse(&bad).unwrap_err().to_string().contains("UTF-8"));
    }

    /// A chain of 200,000 anonymous members, each inside the previous: answered
    /// without recursion (a recursive search overflows the test thread's stack).
    #[test]
    fn deeply_nested_anonymous_members_do_not_exhaust_the_stack() {
        const DEPTH: u32 = 200_000;
        let mut b = Builder::new();
        let int = b.ty("int", KIND_INT, 0, 4, &[32]);
        let leaf = b.name("leaf");
        // Ids: int = 1, outer = 2, the chain 3..=DEPTH+2, the last one has `leaf`.
        b.ty("outer", KIND_STRUCT, 1, 4, &[0, 3, 0]);
        for i in 0..DEPTH {
            let id = 3 + i;
            if i + 1 == DEPTH {
                b.ty("", KIND_STRUCT, 1, 4, &[leaf, int, 0]);
            } else {
                b.ty("", KIND_STRUCT, 1, 4, &[0, id + 1, 0]);
            }
        }
        let btf = KernelBtf::from_bytes(&b.bytes(true), Path::new("deep")).unwrap();
        assert!(btf.has_field("struct", "outer", "leaf"));
        assert!(!btf.has_field("struct", "outer", "other"));
    }

    /// The same answers as btf-rs (the parser this module used before) for every
    /// name of the given BTF: types of each kind, functions, every member of every
    /// struct and union, every enumerator, and made-up names.
    fn agrees_with_btf_rs(raw: &[u8], what: &str) -> usize {
        use btf_rs::{Btf, Type};
        let ours = KernelBtf::from_bytes(raw, Path::new(what)).unwrap();
        let theirs = Btf::from_bytes(raw).unwrap();
        let (_, last) = theirs.base().type_id_range();
        assert_eq!(ours.type_count(), last, "{what}: type count");
        let named = |id: u32| -> Option<(String, Type)> {
            let t = theirs.resolve_type_by_id(id).ok()?;
            let n = theirs.resolve_name(t.as_btf_type()?).ok()?;
            (!n.is_empty()).then_some((n, t))
        };
        let mut checked = 0;
        let mut funcs_seen = HashSet::new();
        for id in 1..=last {
            let Some((name, ty)) = named(id) else {
                continue;
            };
            let ids = theirs.resolve_ids_by_name(&name).unwrap();
            let kinds: Vec<Type> = ids
                .iter()
                .map(|i| theirs.resolve_type_by_id(*i).unwrap())
                .collect();
            let any = |f: &dyn Fn(&Type) -> bool| kinds.iter().any(f);
            assert_eq!(
                ours.has_type("struct", &name),
                any(&|t| matches!(t, Type::Struct(_))),
                "{what}: struct {name}"
            );
            assert_eq!(
                ours.has_type("union", &name),
                any(&|t| matches!(t, Type::Union(_))),
                "{what}: union {name}"
            );
            assert_eq!(
                ours.has_type("enum", &name),
                any(&|t| matches!(t, Type::Enum(_) | Type::Enum64(_))),
                "{what}: enum {name}"
            );
            assert_eq!(
                ours.has_type("typedef", &name),
                any(&|t| matches!(t, Type::Typedef(_))),
                "{what}: typedef {name}"
            );
            assert_eq!(
                ours.has_func(&name),
                any(&|t| matches!(t, Type::Func(_))),
                "{what}: func {name}"
            );
            if matches!(ty, Type::Func(_)) && funcs_seen.insert(name.clone()) {
                let first = ids
                    .iter()
                    .copied()
                    .find(|i| matches!(theirs.resolve_type_by_id(*i), Ok(Type::Func(_))));
                assert_eq!(ours.func_id(&name), first, "{what}: func id of {name}");
            }
            checked += 5;
            match &ty {
                Type::Struct(s) | Type::Union(s) => {
                    let kind = if matches!(ty, Type::Struct(_)) {
                        "struct"
                    } else {
                        "union"
                    };
                    for m in &s.members {
                        if let Ok(f) = theirs.resolve_name(m) {
                            if !f.is_empty() {
                                assert!(
                                    ours.has_field(kind, &name, &f),
                                    "{what}: {kind} {name}.{f}"
                                );
                                checked += 1;
                            }
                        }
                    }
                    assert!(!ours.has_field(kind, &name, "bpfpoly_no_such_field"));
                }
                Type::Enum(e) => {
                    for m in &e.members {
                        let v = theirs.resolve_name(m).unwrap();
                        assert!(ours.has_enum_value(&name, &v), "{what}: {name}.{v}");
                        checked += 1;
                    }
                }
                Type::Enum64(e) => {
                    for m in &e.members {
                        let v = theirs.resolve_name(m).unwrap();
                        assert!(ours.has_enum_value(&name, &v), "{what}: {name}.{v}");
                        checked += 1;
                    }
                }
                _ => {}
            }
        }
        for made_up in ["bpfpoly_no_such_type", "", " ", "task_struct "] {
            for kind in ["struct", "union", "enum", "typedef"] {
                assert!(!ours.has_type(kind, made_up), "{what}: {kind} {made_up:?}");
            }
            assert!(!ours.has_func(made_up));
        }
        checked
    }

    #[test]
    fn agrees_with_btf_rs_on_the_builtin_objects() {
        use object::{Object as _, ObjectSection as _};
        for name in crate::builtin::names() {
            let obj = object::File::parse(crate::builtin::builtin(name).unwrap()).unwrap();
            let btf = obj.section_by_name(".BTF").unwrap().data().unwrap();
            assert!(agrees_with_btf_rs(btf, name) > 0, "{name}: nothing checked");
        }
    }

    #[test]
    fn agrees_with_btf_rs_on_this_kernel() {
        let raw = std::fs::read(VMLINUX_BTF).expect("this kernel's BTF (/sys/kernel/btf/vmlinux)");
        let checked = agrees_with_btf_rs(&raw, VMLINUX_BTF);
        assert!(checked > 300_000, "only {checked} answers compared");
    }

    /// Debian 12's 6.1 kernel BTF (`make deps` caches it; `cli_profile` needs it too).
    #[test]
    fn agrees_with_btf_rs_on_debian_61() {
        let cache = std::env::var_os("BPFPOLY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bpfpoly")
            });
        let path = cache.join("btf/debian-6.1-cloud.btf");
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") => {
                eprintln!(
                    "skipped: {}: {e} and BPFPOLY_SKIP_PRIVILEGED=1",
                    path.display()
                );
                return;
            }
            Err(e) => panic!(
                "{}: {e}: run `make deps` (e2e/fetch-btf.sh) to fetch the Debian 6.1 kernel's BTF",
                path.display()
            ),
        };
        let checked = agrees_with_btf_rs(&raw, "debian-6.1");
        assert!(checked > 200_000, "only {checked} answers compared");
    }

    #[test]
    fn answers_on_this_kernel() {
        let Some(raw) = vmlinux() else { return };
        let btf = KernelBtf::from_bytes(&raw, Path::new(VMLINUX_BTF)).unwrap();
        let q = |s: &str| btf.answer(&Query::parse(s).unwrap());
        assert_eq!(q("type:struct task_struct"), Some(true));
        assert_eq!(q("type:union task_struct"), Some(false));
        assert_eq!(q("type:typedef u32"), Some(true));
        assert_eq!(q("type:enum bpf_func_id"), Some(true));
        assert_eq!(q("field:struct task_struct.loginuid"), Some(true));
        // `dev` sits in an anonymous union inside an anonymous struct inside an
        // anonymous union; `protocol` in the anonymous `headers` struct group.
        assert_eq!(q("field:struct sk_buff.dev"), Some(true));
        assert_eq!(q("field:struct sk_buff.protocol"), Some(true));
        assert_eq!(q("field:struct sk_buff.loginuid"), Some(false));
        assert_eq!(q("field:struct task_struct.no_such_field_x"), Some(false));
        assert_eq!(
            q("enum:enum bpf_func_id.BPF_FUNC_ringbuf_output"),
            Some(true)
        );
        assert_eq!(q("enum:enum bpf_func_id.BPF_FUNC_nope"), Some(false));
        // An ENUM64 on x86-64.
        assert_eq!(
            q("enum:enum perf_callchain_context.PERF_CONTEXT_USER"),
            Some(true)
        );
        assert_eq!(q("func:do_sys_openat2"), Some(true));
        assert_eq!(q("func:task_struct"), Some(false));
        assert_eq!(q("helper:xdp:bpf_redirect"), None);
    }
}
