//! Kernel BTF: read once, hashed once, parsed by `btf-rs` into memory with its
//! name index (name → type ids), then queried by name for the BTF facts of
//! `BpfNodeProfile.spec.queries` (`type:`, `field:`, `enum:`, `func:`).
//!
//! The file is untrusted input (`--btf-path` may name anything): its size is
//! capped before it is read, and every failure is an error naming the file.

use std::{
    collections::HashSet,
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
};

use bpfpoly_crds::requirement::Query;
use btf_rs::{Btf, BtfType, Type};
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

/// Parsed kernel BTF with its digest, ready to answer queries.
pub struct KernelBtf {
    btf: Btf,
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
    #[allow(dead_code)] // For the `run` mode; `profile` takes the limit from its flag.
    pub fn load(path: &Path) -> Result<KernelBtf, BtfError> {
        Self::load_with_limit(path, DEFAULT_MAX_BTF_BYTES)
    }

    /// Loads raw BTF, refusing files larger than `max_bytes`.
    pub fn load_with_limit(path: &Path, max_bytes: u64) -> Result<KernelBtf, BtfError> {
        let bytes = read_capped(path, max_bytes)?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses raw BTF already in memory; `source` names it in errors and status.
    pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<KernelBtf, BtfError> {
        let malformed = |reason: String| BtfError::Malformed {
            path: source.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(BtfError::Empty {
                path: source.to_path_buf(),
            });
        }
        check_header(bytes).map_err(malformed)?;
        let btf = Btf::from_bytes(bytes).map_err(|e| malformed(describe_parse_error(e)))?;
        let (_, last_id) = btf.base().type_id_range();
        Ok(KernelBtf {
            btf,
            source: source.to_path_buf(),
            sha256: hex::encode(Sha256::digest(bytes)),
            type_count: last_id,
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
        self.types_named(name).any(|t| kind_matches(kind, &t))
    }

    /// The struct/union `name` has a member `field`, directly or inside an
    /// anonymous struct/union member (as C lets you write `t->field`).
    pub fn has_field(&self, kind: &str, name: &str, field: &str) -> bool {
        let mut seen = HashSet::new();
        self.types_named(name)
            .filter(|t| kind_matches(kind, t))
            .any(|t| self.composite_has_member(&t, field, &mut seen))
    }

    /// The enum (ENUM or ENUM64) `name` has the enumerator `value`.
    pub fn has_enum_value(&self, name: &str, value: &str) -> bool {
        self.types_named(name).any(|t| {
            let names: Vec<Option<String>> = match &t {
                Type::Enum(e) => e
                    .members
                    .iter()
                    .map(|m| self.btf.resolve_name(m).ok())
                    .collect(),
                Type::Enum64(e) => e
                    .members
                    .iter()
                    .map(|m| self.btf.resolve_name(m).ok())
                    .collect(),
                _ => return false,
            };
            names.iter().flatten().any(|n| n == value)
        })
    }

    /// A BTF FUNC named `name` exists (a kernel function: fentry target, kfunc).
    pub fn has_func(&self, name: &str) -> bool {
        self.types_named(name).any(|t| matches!(t, Type::Func(_)))
    }

    fn types_named<'a>(&'a self, name: &str) -> impl Iterator<Item = Type> + 'a {
        let ids = if name.is_empty() {
            Vec::new()
        } else {
            self.btf.resolve_ids_by_name(name).unwrap_or_default()
        };
        ids.into_iter()
            .filter_map(|id| self.btf.resolve_type_by_id(id).ok())
    }

    /// Looks through anonymous members; `seen` holds the anonymous types already
    /// searched, so hostile BTF with cycles or shared members stays linear.
    fn composite_has_member(&self, ty: &Type, field: &str, seen: &mut HashSet<u32>) -> bool {
        let members = match ty {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => return false,
        };
        members.iter().any(|m| match self.btf.resolve_name(m) {
            Ok(n) if n == field => true,
            Ok(n) if n.is_empty() => m
                .get_type_id()
                .and_then(|id| self.strip_modifiers(id))
                .filter(|(id, _)| seen.insert(*id))
                .is_some_and(|(_, t)| self.composite_has_member(&t, field, seen)),
            _ => false,
        })
    }

    /// Follows const/volatile/restrict/type-tag from type `id` to the type they
    /// qualify; returns its id and the type.
    fn strip_modifiers(&self, mut id: u32) -> Option<(u32, Type)> {
        for _ in 0..MAX_MODIFIERS {
            let ty = self.btf.resolve_type_by_id(id).ok()?;
            match &ty {
                Type::Const(m) | Type::Volatile(m) | Type::Restrict(m) => id = m.get_type_id()?,
                Type::TypeTag(m) => id = m.get_type_id()?,
                _ => return Some((id, ty)),
            }
        }
        None
    }
}

fn split_kind(s: &str) -> Option<(&str, &str)> {
    s.split_once(' ').map(|(k, n)| (k, n.trim()))
}

fn kind_matches(kind: &str, ty: &Type) -> bool {
    matches!(
        (kind, ty),
        ("struct", Type::Struct(_))
            | ("union", Type::Union(_))
            | ("enum", Type::Enum(_) | Type::Enum64(_))
            | ("typedef", Type::Typedef(_))
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

/// Checks the fixed BTF header against the file length before the parser runs,
/// so a truncated or foreign file gets a message saying what it is. (btf-rs
/// does the real parsing; this only reads the 24-byte `struct btf_header`.)
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

fn describe_parse_error(e: btf_rs::Error) -> String {
    match e {
        btf_rs::Error::IO(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "truncated or corrupt: a type record runs past the end of its section".to_string()
        }
        other => format!("corrupt: {other}"),
    }
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
