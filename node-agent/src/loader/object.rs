//! What an eBPF object holds, read without the kernel: its programs (by C function
//! name, with their section kind), maps, `.rodata`/`.data`/`.bss` globals with their
//! BTF scalar types, and BTF functions. And the check of a variant against it, done
//! before anything is loaded, so a mismatch between the custom resource and the
//! object is a clear message rather than a confusing verifier or aya error.
//!
//! Objects are untrusted bytes: `crate::inspect` checks what aya's parser takes on
//! trust before it runs, every failure is an error, and the parsing runs under
//! `catch_unwind` so that a parser bug on hostile input cannot take the agent down.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
};

use bpfpoly_crds::program::{Attach, ConfigType};

use crate::inspect::{inspect_unhashed, InspectError};

/// `BPF_MAP_TYPE_PROG_ARRAY`, by its bpftool name.
pub const MAP_TYPE_PROG_ARRAY: &str = "prog_array";
/// Global selecting the dispatch mechanism (`__u32`, see bpfpoly.h).
pub const DISPATCH_MODE_GLOBAL: &str = "bpfpoly_dispatch_mode";
/// Static-dispatch enable mask (`__u64`, see bpfpoly.h).
pub const HANDLER_MASK_GLOBAL: &str = "bpfpoly_handler_mask";
/// Per-CPU dispatch counters (see bpfpoly.h).
pub const DISPATCH_COUNTERS_MAP: &str = "bpfpoly_dispatch";
/// Name of the freplace slot function of `key`.
pub fn slot_function(key: u32) -> String {
    format!("bpfpoly_slot_{key}")
}

/// The kind of a program, from its ELF section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// `xdp`
    Xdp,
    /// `classifier` / `tc` (sched_cls)
    Classifier,
    /// `tracepoint/<category>/<name>`
    TracePoint,
    /// `tp_btf/<name>`
    TpBtf,
    /// `raw_tp/<name>` / `raw_tracepoint/<name>`
    RawTracePoint,
    /// `kprobe/<function>`
    KProbe,
    /// `kretprobe/<function>`
    KRetProbe,
    /// `fentry/<function>`
    FEntry,
    /// `fexit/<function>`
    FExit,
    /// `freplace/<function>`
    Extension,
    /// Anything else aya knows.
    Other,
}

impl ProgramKind {
    /// From the program type (bpftool name) and ELF section, as `inspect` reports them.
    fn from_inspected(program_type: &str, section: &str) -> Self {
        let prefix = section.split('/').next().unwrap_or_default();
        match (program_type, prefix) {
            ("xdp", _) => Self::Xdp,
            ("sched_cls", _) => Self::Classifier,
            ("tracepoint", _) => Self::TracePoint,
            ("raw_tracepoint", _) => Self::RawTracePoint,
            ("ext", _) => Self::Extension,
            ("kprobe", "kprobe") => Self::KProbe,
            ("kprobe", "kretprobe") => Self::KRetProbe,
            ("tracing", "tp_btf") => Self::TpBtf,
            ("tracing", "fentry" | "fentry.s") => Self::FEntry,
            ("tracing", "fexit" | "fexit.s") => Self::FExit,
            _ => Self::Other,
        }
    }

    /// The section spelling, for messages.
    pub fn section(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Classifier => "classifier",
            Self::TracePoint => "tracepoint",
            Self::TpBtf => "tp_btf",
            Self::RawTracePoint => "raw_tp",
            Self::KProbe => "kprobe",
            Self::KRetProbe => "kretprobe",
            Self::FEntry => "fentry",
            Self::FExit => "fexit",
            Self::Extension => "freplace",
            Self::Other => "another program type",
        }
    }
}

/// The attach kinds of the API, with the program kind each needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    /// `attach.xdp`
    Xdp,
    /// `attach.tc`
    Tc,
    /// `attach.tracepoint`
    TracePoint,
    /// `attach.tpBtf`
    TpBtf,
    /// `attach.rawTracepoint`
    RawTracePoint,
    /// `attach.kprobe`
    KProbe,
    /// `attach.fentry`
    FEntry,
    /// `attach.fexit`
    FExit,
}

impl AttachKind {
    /// The kind set in `attach` (the first, if the API validation was bypassed).
    pub fn of(attach: &Attach) -> Option<Self> {
        [
            (attach.xdp.is_some(), Self::Xdp),
            (attach.tc.is_some(), Self::Tc),
            (attach.tracepoint.is_some(), Self::TracePoint),
            (attach.tp_btf.is_some(), Self::TpBtf),
            (attach.raw_tracepoint.is_some(), Self::RawTracePoint),
            (attach.kprobe.is_some(), Self::KProbe),
            (attach.fentry.is_some(), Self::FEntry),
            (attach.fexit.is_some(), Self::FExit),
        ]
        .into_iter()
        .find_map(|(set, kind)| set.then_some(kind))
    }

    /// The program kind this attachment needs.
    pub fn program_kind(self) -> ProgramKind {
        match self {
            Self::Xdp => ProgramKind::Xdp,
            Self::Tc => ProgramKind::Classifier,
            Self::TracePoint => ProgramKind::TracePoint,
            Self::TpBtf => ProgramKind::TpBtf,
            Self::RawTracePoint => ProgramKind::RawTracePoint,
            Self::KProbe => ProgramKind::KProbe,
            Self::FEntry => ProgramKind::FEntry,
            Self::FExit => ProgramKind::FExit,
        }
    }

    /// The event or function a BTF-typed attachment names (tp_btf, raw_tp, fentry, fexit);
    /// `None` for the other kinds, or when it is not set.
    pub fn btf_target(self, attach: &Attach) -> Option<&str> {
        match self {
            Self::TpBtf => attach.tp_btf.as_ref().map(|t| t.name.as_str()),
            Self::RawTracePoint => attach.raw_tracepoint.as_ref().map(|t| t.name.as_str()),
            Self::FEntry => attach.fentry.as_ref().map(|t| t.function.as_str()),
            Self::FExit => attach.fexit.as_ref().map(|t| t.function.as_str()),
            _ => None,
        }
    }

    /// The API field name.
    pub fn field(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::TracePoint => "tracepoint",
            Self::TpBtf => "tpBtf",
            Self::RawTracePoint => "rawTracepoint",
            Self::KProbe => "kprobe",
            Self::FEntry => "fentry",
            Self::FExit => "fexit",
        }
    }
}

/// The BTF type of a global, through typedefs and qualifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// `_Bool` (BTF INT with the BOOL encoding).
    Bool,
    /// An integer of `bytes` bytes.
    Int {
        /// Size in bytes.
        bytes: usize,
        /// Signed encoding.
        signed: bool,
    },
    /// Not a scalar: `struct`, array, pointer, ...
    Other(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool => f.write_str("bool"),
            Scalar::Int { bytes, signed } => {
                write!(f, "{}{}", if *signed { "i" } else { "u" }, bytes * 8)
            }
            Scalar::Other(what) => f.write_str(what),
        }
    }
}

/// A global variable of a data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// `.rodata`, `.data` or `.bss`.
    pub section: String,
    /// Size in bytes (from the section's BTF).
    pub size: usize,
    /// Its BTF type.
    pub scalar: Scalar,
}

/// What an object holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Programs by C function name.
    pub programs: BTreeMap<String, ProgramKind>,
    /// Maps by name, with the map type (bpftool name; data sections excluded).
    pub maps: BTreeMap<String, String>,
    /// Globals of `.rodata`, `.data` and `.bss` by name.
    pub globals: BTreeMap<String, Global>,
    /// Functions that are not programs (global subprograms, e.g. freplace slots).
    pub functions: BTreeSet<String>,
    /// Whether it has CO-RE relocations: it loads relocated against the kernel's BTF.
    pub core_relocations: bool,
}

/// Why bytes are not a usable eBPF object.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// `inspect` refused it (empty, not ELF, not eBPF, malformed).
    #[error(transparent)]
    Invalid(#[from] InspectError),
    /// A parser panicked (a bug on hostile input).
    #[error("the object parser failed on this input ({0})")]
    Panicked(String),
}

/// Reads what `bytes` (an eBPF ELF object) holds: `crate::inspect`, which checks
/// what the loader's parser takes on trust, then parses it as the loader will.
pub fn inspect(bytes: &[u8]) -> Result<ObjectInfo, ObjectError> {
    let inspected = catch_unwind(AssertUnwindSafe(|| inspect_unhashed(bytes)))
        .map_err(|panic| ObjectError::Panicked(panic_message(&*panic)))??;
    Ok(ObjectInfo {
        programs: inspected
            .programs
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    ProgramKind::from_inspected(&p.program_type, &p.section),
                )
            })
            .collect(),
        maps: inspected
            .maps
            .iter()
            .filter(|m| m.definition != "data")
            .map(|m| (m.name.clone(), m.map_type.clone()))
            .collect(),
        globals: inspected
            .globals
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    Global {
                        section: g.section.clone(),
                        size: usize::try_from(g.size).unwrap_or(usize::MAX),
                        scalar: Scalar::parse(&g.type_name),
                    },
                )
            })
            .collect(),
        functions: inspected.functions.into_iter().collect(),
        core_relocations: inspected.core_relocations,
    })
}

impl Scalar {
    /// From `inspect`'s resolved type name (`bool`, `u32`, `i64`, `struct x`...).
    fn parse(type_name: &str) -> Self {
        if type_name == "bool" {
            return Scalar::Bool;
        }
        let bits = type_name
            .get(1..)
            .and_then(|rest| rest.parse::<usize>().ok())
            .filter(|b| *b > 0 && b % 8 == 0);
        match (type_name.get(..1), bits) {
            (Some("u"), Some(bits)) => Scalar::Int {
                bytes: bits / 8,
                signed: false,
            },
            (Some("i"), Some(bits)) => Scalar::Int {
                bytes: bits / 8,
                signed: true,
            },
            _ => Scalar::Other(type_name.to_owned()),
        }
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// The object with 8-byte alignment (aya's ELF reader reads headers in place):
/// borrowed when the input is aligned, else an aligned copy.
pub(crate) struct Aligned<'a> {
    borrowed: Option<&'a [u8]>,
    owned: Vec<u64>,
    len: usize,
}

impl<'a> Aligned<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        if bytes.as_ptr().align_offset(8) == 0 {
            return Self {
                borrowed: Some(bytes),
                owned: Vec::new(),
                len: bytes.len(),
            };
        }
        let mut owned = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in owned.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(buf);
        }
        Self {
            borrowed: None,
            owned,
            len: bytes.len(),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self.borrowed {
            Some(b) => b,
            None => {
                // SAFETY: `owned` holds at least `len` initialized bytes (u64 has no
                // padding), and u8 has no alignment requirement.
                unsafe { std::slice::from_raw_parts(self.owned.as_ptr().cast::<u8>(), self.len) }
            }
        }
    }
}

/// Whether a global of BTF type `found` (and `size` bytes) can hold a CR `declared`.
pub fn compatible(declared: ConfigType, global: &Global) -> bool {
    if global.size != declared.size() {
        return false;
    }
    match (&global.scalar, declared) {
        (Scalar::Bool, ConfigType::Bool) => true,
        (Scalar::Int { bytes, signed }, t) if t != ConfigType::Bool => {
            *bytes == t.size() && *signed == t.signed()
        }
        _ => false,
    }
}

/// How the CR's C type spelling of a config type reads in messages.
fn c_type(t: ConfigType) -> &'static str {
    match t {
        ConfigType::Bool => "bool (_Bool, 1 byte)",
        ConfigType::U8 => "u8 (__u8, 1 byte)",
        ConfigType::U16 => "u16 (__u16, 2 bytes)",
        ConfigType::U32 => "u32 (__u32, 4 bytes)",
        ConfigType::U64 => "u64 (__u64, 8 bytes)",
        ConfigType::I32 => "i32 (__s32, 4 bytes)",
        ConfigType::I64 => "i64 (__s64, 8 bytes)",
    }
}

/// The dispatch mechanism the agent loads, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Tail calls through the PROG_ARRAY.
    TailCall,
    /// Inlined handlers gated by `bpfpoly_handler_mask`.
    Static,
    /// freplace of `bpfpoly_slot_<key>`.
    Freplace,
}

impl Mechanism {
    /// The spelling used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::TailCall => "tailCall",
            Mechanism::Static => "static",
            Mechanism::Freplace => "freplace",
        }
    }

    /// The value of `bpfpoly_dispatch_mode`.
    pub const fn mode(self) -> u32 {
        match self {
            Mechanism::TailCall => 0,
            Mechanism::Static => 1,
            Mechanism::Freplace => 2,
        }
    }
}

pub mod check;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspected_type_names_become_scalars() {
        assert_eq!(Scalar::parse("bool"), Scalar::Bool);
        let int = |bytes, signed| Scalar::Int { bytes, signed };
        assert_eq!(Scalar::parse("u32"), int(4, false));
        assert_eq!(Scalar::parse("i64"), int(8, true));
        assert_eq!(Scalar::parse("u8[16]"), Scalar::Other("u8[16]".into()));
        assert_eq!(
            Scalar::parse("struct foo"),
            Scalar::Other("struct foo".into())
        );
    }

    #[test]
    fn hostile_bytes_are_errors() {
        for bytes in [&b""[..], b"garbage", b"\x7fELF\x02\x01"] {
            assert!(inspect(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn types_are_compatible_by_size_and_sign() {
        let g = |scalar, size| Global {
            section: ".rodata".into(),
            size,
            scalar,
        };
        let int = |bytes, signed| Scalar::Int { bytes, signed };
        assert!(compatible(ConfigType::Bool, &g(Scalar::Bool, 1)));
        assert!(!compatible(ConfigType::U8, &g(Scalar::Bool, 1)));
        assert!(!compatible(ConfigType::Bool, &g(int(1, false), 1)));
        assert!(compatible(ConfigType::U32, &g(int(4, false), 4)));
        assert!(!compatible(ConfigType::I32, &g(int(4, false), 4)));
        assert!(compatible(ConfigType::I64, &g(int(8, true), 8)));
        assert!(!compatible(ConfigType::U16, &g(int(4, false), 4)));
        assert!(!compatible(
            ConfigType::U32,
            &g(Scalar::Other("a struct".into()), 4)
        ));
    }
}
