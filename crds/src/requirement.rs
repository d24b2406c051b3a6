//! Requirement syntax: kernel version comparators, BTF facts and known kernel feature names.
//!
//! A BTF fact is turned into a *query* string (`type:struct X`, `field:struct X.f`,
//! `enum:enum E.V`, `func:name`, `helper:<progtype>:<helper>`) that the agent answers from the
//! node's BTF and probes.

use std::cmp::Ordering;
use std::fmt;

use crate::helpers::HELPERS;

/// A kernel version `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct KernelVersion {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Patch (sublevel) number.
    pub patch: u32,
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl KernelVersion {
    /// Parses the leading `major.minor[.patch]` of a kernel release string such as
    /// `6.1.0-54-cloud-amd64`, `5.15.0-1051-azure`, `4.18.0-513.el8.x86_64` or
    /// `6.18.44-fc-v669`. Anything after the numeric prefix is ignored.
    pub fn from_release(release: &str) -> Result<KernelVersion, String> {
        let mut parts = [0u32; 3];
        let mut count = 0;
        let mut rest = release.trim();
        while count < 3 {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                break;
            }
            parts[count] = rest[..digits]
                .parse()
                .map_err(|_| format!("kernel release {release:?}: number too large"))?;
            count += 1;
            rest = &rest[digits..];
            match rest.strip_prefix('.') {
                Some(r) if r.starts_with(|c: char| c.is_ascii_digit()) => rest = r,
                _ => break,
            }
        }
        if count < 2 {
            return Err(format!(
                "kernel release {release:?}: expected it to start with MAJOR.MINOR"
            ));
        }
        Ok(KernelVersion {
            major: parts[0],
            minor: parts[1],
            patch: parts[2],
        })
    }

    /// Parses a strict version `MAJOR.MINOR[.PATCH]` (as written in a comparator).
    pub fn parse_strict(s: &str) -> Result<KernelVersion, String> {
        let s = s.trim();
        let fields: Vec<&str> = s.split('.').collect();
        if !(2..=3).contains(&fields.len())
            || fields
                .iter()
                .any(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!("{s:?} is not a version MAJOR.MINOR[.PATCH]"));
        }
        let num = |f: &str| {
            f.parse::<u32>()
                .map_err(|_| format!("{s:?}: version number too large"))
        };
        Ok(KernelVersion {
            major: num(fields[0])?,
            minor: num(fields[1])?,
            patch: fields.get(2).map(|f| num(f)).transpose()?.unwrap_or(0),
        })
    }
}

/// A comparison operator in a kernel requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `<`
    Lt,
    /// `=` or `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Ge => ord != Ordering::Less,
            Op::Gt => ord == Ordering::Greater,
            Op::Le => ord != Ordering::Greater,
            Op::Lt => ord == Ordering::Less,
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
            Op::Eq => "=",
            Op::Ne => "!=",
        }
    }
}

/// A list of version comparators that must all hold, e.g. `>=5.4, <6.0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRequirement {
    /// The comparators.
    pub comparators: Vec<(Op, KernelVersion)>,
}

impl KernelRequirement {
    /// Parses `>=5.4, <6.0`. Every comparator needs an operator.
    pub fn parse(s: &str) -> Result<KernelRequirement, String> {
        let mut comparators = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("{s:?}: empty comparator"));
            }
            let (op, rest) = [
                (">=", Op::Ge),
                ("<=", Op::Le),
                ("==", Op::Eq),
                ("!=", Op::Ne),
                (">", Op::Gt),
                ("<", Op::Lt),
                ("=", Op::Eq),
            ]
            .iter()
            .find_map(|(p, op)| part.strip_prefix(p).map(|r| (*op, r)))
            .ok_or_else(|| format!("{part:?} has no comparator; use one of >=, >, <=, <, =, !="))?;
            comparators.push((op, KernelVersion::parse_strict(rest)?));
        }
        Ok(KernelRequirement { comparators })
    }

    /// True when the version satisfies every comparator.
    pub fn matches(&self, v: KernelVersion) -> bool {
        self.comparators
            .iter()
            .all(|(op, want)| op.holds(v.cmp(want)))
    }
}

impl fmt::Display for KernelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .comparators
            .iter()
            .map(|(op, v)| format!("{}{}", op.as_str(), v))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// The keyword before a BTF type name.
const TYPE_KINDS: &[&str] = &["struct", "union", "enum", "typedef"];

fn is_ident(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Checks `struct X` (also union, enum, typedef). Returns the normalized form.
pub fn parse_type(s: &str) -> Result<String, String> {
    let mut words = s.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(kind), Some(name), None) if TYPE_KINDS.contains(&kind) && is_ident(name) => {
            Ok(format!("{kind} {name}"))
        }
        _ => Err(format!(
            "{s:?} is not a BTF type; expected `struct NAME` (or union, enum, typedef)"
        )),
    }
}

/// Checks `struct X.field` (or union). Returns the normalized form.
pub fn parse_field(s: &str) -> Result<String, String> {
    let err = || format!("{s:?} is not a BTF field; expected `struct NAME.FIELD`");
    let (ty, field) = s.rsplit_once('.').ok_or_else(err)?;
    let ty = parse_type(ty).map_err(|_| err())?;
    if !(ty.starts_with("struct ") || ty.starts_with("union ")) || !is_ident(field) {
        return Err(err());
    }
    Ok(format!("{ty}.{field}"))
}

/// Checks `enum E.VALUE`. Returns the normalized form.
pub fn parse_enum_value(s: &str) -> Result<String, String> {
    let err = || format!("{s:?} is not a BTF enum value; expected `enum NAME.VALUE`");
    let (ty, value) = s.rsplit_once('.').ok_or_else(err)?;
    let ty = parse_type(ty).map_err(|_| err())?;
    if !ty.starts_with("enum ") || !is_ident(value) {
        return Err(err());
    }
    Ok(format!("{ty}.{value}"))
}

/// Checks a function name.
pub fn parse_function(s: &str) -> Result<String, String> {
    if is_ident(s.trim()) {
        Ok(s.trim().to_string())
    } else {
        Err(format!("{s:?} is not a function name"))
    }
}

/// Program type names (bpftool's), with the kernel's `enum bpf_prog_type` number.
pub const PROGRAM_TYPES: &[(&str, u32)] = &[
    ("socket_filter", 1),
    ("kprobe", 2),
    ("sched_cls", 3),
    ("sched_act", 4),
    ("tracepoint", 5),
    ("xdp", 6),
    ("perf_event", 7),
    ("cgroup_skb", 8),
    ("cgroup_sock", 9),
    ("lwt_in", 10),
    ("lwt_out", 11),
    ("lwt_xmit", 12),
    ("sock_ops", 13),
    ("sk_skb", 14),
    ("cgroup_device", 15),
    ("sk_msg", 16),
    ("raw_tracepoint", 17),
    ("cgroup_sock_addr", 18),
    ("lwt_seg6local", 19),
    ("lirc_mode2", 20),
    ("sk_reuseport", 21),
    ("flow_dissector", 22),
    ("cgroup_sysctl", 23),
    ("raw_tracepoint_writable", 24),
    ("cgroup_sockopt", 25),
    ("tracing", 26),
    ("struct_ops", 27),
    ("ext", 28),
    ("lsm", 29),
    ("sk_lookup", 30),
    ("syscall", 31),
    ("netfilter", 32),
];

/// Map type names (bpftool's), with the kernel's `enum bpf_map_type` number.
pub const MAP_TYPES: &[(&str, u32)] = &[
    ("hash", 1),
    ("array", 2),
    ("prog_array", 3),
    ("perf_event_array", 4),
    ("percpu_hash", 5),
    ("percpu_array", 6),
    ("stack_trace", 7),
    ("cgroup_array", 8),
    ("lru_hash", 9),
    ("lru_percpu_hash", 10),
    ("lpm_trie", 11),
    ("array_of_maps", 12),
    ("hash_of_maps", 13),
    ("devmap", 14),
    ("sockmap", 15),
    ("cpumap", 16),
    ("xskmap", 17),
    ("sockhash", 18),
    ("cgroup_storage", 19),
    ("reuseport_sockarray", 20),
    ("percpu_cgroup_storage", 21),
    ("queue", 22),
    ("stack", 23),
    ("sk_storage", 24),
    ("devmap_hash", 25),
    ("struct_ops", 26),
    ("ringbuf", 27),
    ("inode_storage", 28),
    ("task_storage", 29),
    ("bloom_filter", 30),
    ("user_ringbuf", 31),
    ("cgrp_storage", 32),
    ("arena", 33),
];

/// Checks a program type name.
pub fn parse_program_type(s: &str) -> Result<&'static str, String> {
    lookup(PROGRAM_TYPES, s, "program type")
}

/// Checks a map type name.
pub fn parse_map_type(s: &str) -> Result<&'static str, String> {
    lookup(MAP_TYPES, s, "map type")
}

/// Checks a helper name (`bpf_` prefix optional). Returns the `bpf_`-prefixed name.
pub fn parse_helper(s: &str) -> Result<&'static str, String> {
    let full = if s.starts_with("bpf_") {
        s.to_string()
    } else {
        format!("bpf_{s}")
    };
    HELPERS
        .iter()
        .find(|(n, _)| *n == full)
        .map(|(n, _)| *n)
        .ok_or_else(|| format!("{s:?} is not a known helper (e.g. bpf_ringbuf_output)"))
}

/// The `enum bpf_func_id` number of a helper.
pub fn helper_id(name: &str) -> Option<u32> {
    HELPERS.iter().find(|(n, _)| *n == name).map(|(_, id)| *id)
}

fn lookup(table: &[(&'static str, u32)], s: &str, what: &str) -> Result<&'static str, String> {
    table
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(n, _)| *n)
        .ok_or_else(|| {
            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!("{s:?} is not a known {what}; known: {}", known.join(", "))
        })
}

/// A BTF or probe fact the agent answers, as carried in `BpfNodeProfile.spec.queries`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Query {
    /// `type:struct X`
    Type(String),
    /// `field:struct X.f`
    Field(String),
    /// `enum:enum E.V`
    Enum(String),
    /// `func:name`
    Func(String),
    /// `helper:<progtype>:<helper>`
    Helper {
        /// Program type name.
        program_type: String,
        /// Helper name with `bpf_` prefix.
        helper: String,
    },
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::Type(t) => write!(f, "type:{t}"),
            Query::Field(t) => write!(f, "field:{t}"),
            Query::Enum(t) => write!(f, "enum:{t}"),
            Query::Func(t) => write!(f, "func:{t}"),
            Query::Helper {
                program_type,
                helper,
            } => write!(f, "helper:{program_type}:{helper}"),
        }
    }
}

impl Query {
    /// Parses the string form (`type:struct X`, ...), validating the fact's syntax.
    pub fn parse(s: &str) -> Result<Query, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not a query; expected KIND:FACT"))?;
        match kind {
            "type" => parse_type(rest).map(Query::Type),
            "field" => parse_field(rest).map(Query::Field),
            "enum" => parse_enum_value(rest).map(Query::Enum),
            "func" => parse_function(rest).map(Query::Func),
            "helper" => {
                let (pt, h) = rest
                    .split_once(':')
                    .ok_or_else(|| format!("{s:?}: expected helper:PROGRAM_TYPE:HELPER"))?;
                Ok(Query::Helper {
                    program_type: parse_program_type(pt)?.to_string(),
                    helper: parse_helper(h)?.to_string(),
                })
            }
            _ => Err(format!(
                "{s:?}: unknown query kind {kind:?}; expected type, field, enum, func or helper"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> KernelVersion {
        KernelVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn parses_real_release_strings() {
        assert_eq!(
            KernelVersion::from_release("6.1.0-54-cloud-amd64"),
            Ok(v(6, 1, 0))
        );
        assert_eq!(
            KernelVersion::from_release("5.15.0-1051-azure"),
            Ok(v(5, 15, 0))
        );
        assert_eq!(
            KernelVersion::from_release("4.18.0-513.el8.x86_64"),
            Ok(v(4, 18, 0))
        );
        assert_eq!(
            KernelVersion::from_release("6.18.44-fc-v669"),
            Ok(v(6, 18, 44))
        );
        assert_eq!(KernelVersion::from_release("5.4"), Ok(v(5, 4, 0)));
        assert!(KernelVersion::from_release("linux").is_err());
        assert!(KernelVersion::from_release("6").is_err());
        assert!(KernelVersion::from_release("99999999999.1").is_err());
    }

    #[test]
    fn comparators() {
        let r = KernelRequirement::parse(">=5.4, <6.0").unwrap();
        assert!(r.matches(v(5, 4, 0)));
        assert!(r.matches(v(5, 15, 3)));
        assert!(!r.matches(v(6, 0, 0)));
        assert!(!r.matches(v(5, 3, 99)));
        assert_eq!(r.to_string(), ">=5.4.0, <6.0.0");
        assert!(KernelRequirement::parse("5.4").is_err());
        assert!(KernelRequirement::parse(">=5").is_err());
        assert!(KernelRequirement::parse(">=5.4,").is_err());
        assert!(KernelRequirement::parse("~5.4").is_err());
        assert!(KernelRequirement::parse("!=6.1.0")
            .unwrap()
            .matches(v(6, 1, 1)));
    }

    #[test]
    fn btf_fact_syntax() {
        assert_eq!(
            parse_type("struct  task_struct").unwrap(),
            "struct task_struct"
        );
        assert!(parse_type("task_struct").is_err());
        assert!(parse_type("class foo").is_err());
        assert_eq!(
            parse_field("struct task_struct.loginuid").unwrap(),
            "struct task_struct.loginuid"
        );
        assert!(parse_field("struct task_struct").is_err());
        assert!(parse_field("enum bpf_func_id.X").is_err());
        assert!(parse_enum_value("enum bpf_func_id.BPF_FUNC_ringbuf_output").is_ok());
        assert!(parse_enum_value("struct x.y").is_err());
        assert!(parse_program_type("xdp").is_ok());
        assert!(parse_program_type("xdpp").unwrap_err().contains("known"));
        assert_eq!(
            parse_helper("ringbuf_output").unwrap(),
            "bpf_ringbuf_output"
        );
        assert!(parse_helper("bpf_nope").is_err());
        assert_eq!(helper_id("bpf_ringbuf_output"), Some(130));
    }

    #[test]
    fn queries_round_trip() {
        for s in [
            "type:struct task_struct",
            "field:struct task_struct.loginuid",
            "enum:enum bpf_func_id.BPF_FUNC_ringbuf_output",
            "func:do_sys_openat2",
            "helper:xdp:bpf_ringbuf_output",
        ] {
            assert_eq!(Query::parse(s).unwrap().to_string(), s);
        }
        assert!(Query::parse("nope").is_err());
        assert!(Query::parse("kind:x").is_err());
    }
}
