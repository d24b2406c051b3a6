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
    ops::Range,
    path::{Path, PathBuf},
};

use bpfpoly_crds::requirement::Query;
use sha2::{Digest, Sha256};

// Explicit paths: tests/fuzz_objects.rs compiles this file from its source with `#[path]`.
#[path = "btf/index.rs"]
mod index;
use index::{name_hash, name_key, read_u32, string_at, Index, ID_MASK, PARALLEL_HASH_BYTES};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Default cap on the BTF file size. Real vmlinux BTF is 5–10 MiB.
pub const DEFAULT_MAX_BTF_BYTES: u64 = 64 << 20;

/// Longest qualifier chain followed; real BTF has two or three.
const MAX_MODIFIERS: usize = 32;

/// Why BTF could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read within its limit.
    #[error("BTF: {0}")]
    File(#[from] bpfpoly_agent::capped::FileError),
    /// The file is empty.
    #[error("BTF file {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
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

/// Reads at most `max_bytes` from `path` (see `capped`).
fn read_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>, BtfError> {
    Ok(bpfpoly_agent::capped::read_path(path, max_bytes)?)
}

#[cfg(test)]
#[path = "btf/tests.rs"]
mod tests;
