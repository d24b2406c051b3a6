//! `__kconfig` externs, resolved as libbpf resolves them, before aya sees the object.
//!
//! `extern u32 LINUX_KERNEL_VERSION __kconfig;` compiles to an undefined ELF symbol, a
//! BTF VAR with extern linkage and a `.kconfig` DATASEC with no ELF section behind it.
//! aya 0.14 cannot size that section and fails the load ("Unable to determine the size
//! of section .kconfig"). Here the externs are found and checked offline (`externs`),
//! their values are taken from the running kernel (`KernelFacts`), and the object is
//! rewritten (`elf::resolve`) so that the externs are ordinary read-only globals of a
//! new `.rodata.kconfig` section holding those values: a data section aya already
//! turns into a frozen, read-only map, with the code's relocations pointing into it.
//!
//! The rules follow libbpf: `CONFIG_*` values come from `/boot/config-$(uname -r)` or
//! `/proc/config.gz`; `y`/`n`/`m` fill bool, tristate (`enum libbpf_tristate`) and char
//! externs; numbers fill integers (range-checked); quoted strings fill char arrays. A
//! strong extern whose value is missing fails the load with its name; a `__weak` one is
//! zero. `LINUX_KERNEL_VERSION`, `LINUX_HAS_BPF_COOKIE` and `LINUX_HAS_SYSCALL_WRAPPER`
//! come from the kernel; other weak `LINUX_*` names are zero.

pub(crate) mod btf_raw;
pub mod elf;
mod encode;
mod model;
pub mod system;

use std::collections::BTreeMap;

use btf_raw::{kind, RawBtf};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind};

pub use encode::{encode, parse_number};
use encode::{encode_number, encode_tristate};
use model::layout;
pub use model::{Extern, Externs, Kind, KCONFIG_SECTION, MAX_KCONFIG_BYTES, RESOLVED_SECTION};
pub use system::KernelFacts;

/// The DATASEC of `__ksym` externs (kernel symbols; not supported).
const KSYMS_SECTION: &str = ".ksyms";

/// Finds the object's externs and checks, offline, that each one can be resolved: a
/// `__kconfig` extern of a name and type libbpf fills. Any other extern (`__ksym`, an
/// extern function, an undefined symbol without BTF) is a problem naming it.
pub fn externs(elf: &object::File<'_>) -> Result<Externs, Vec<String>> {
    let btf_bytes = elf
        .section_by_name(".BTF")
        .and_then(|s| s.data().ok())
        .filter(|d| !d.is_empty());
    let btf = match btf_bytes.map(RawBtf::parse) {
        Some(Ok(btf)) => Some(btf),
        Some(Err(e)) => return Err(vec![format!(".BTF: {e}")]),
        None => None,
    };
    let mut problems = Vec::new();
    let mut found = Externs::default();

    let undefined = undefined_symbols(elf);

    // Names of the extern VARs and FUNCs BTF knows, by DATASEC.
    let mut ksyms: Vec<String> = Vec::new();
    let mut extern_funcs: Vec<String> = Vec::new();
    if let Some(btf) = &btf {
        for (id, r) in btf.records.iter().enumerate().skip(1) {
            match (r.kind, btf.name(r.name_off)) {
                (kind::DATASEC, Some(KCONFIG_SECTION)) => {
                    if found.datasec != 0 {
                        problems.push(format!("the BTF has two {KCONFIG_SECTION} DATASECs"));
                        continue;
                    }
                    found.datasec = id as u32;
                    kconfig_vars(btf, r, &undefined, &mut found.kconfig, &mut problems);
                }
                (kind::DATASEC, Some(KSYMS_SECTION)) => {
                    for n in 0..r.vlen {
                        let var = u32_at_entry(btf, r, n);
                        if let Some(name) = var
                            .and_then(|v| btf.record(v))
                            .and_then(|v| btf.name(v.name_off))
                        {
                            ksyms.push(name.to_owned());
                        }
                    }
                }
                (kind::FUNC, Some(name)) if (r.vlen as u32) == btf_raw::VAR_EXTERN => {
                    extern_funcs.push(name.to_owned());
                }
                _ => {}
            }
        }
    }

    // Every undefined symbol the code refers to must be a `__kconfig` extern.
    for name in referenced_undefined(elf) {
        if found.kconfig.iter().any(|e| e.name == name) {
            continue;
        }
        problems.push(if extern_funcs.contains(&name) {
            format!("extern function {name} (a kfunc or a function of another object) cannot be resolved; only __kconfig externs are supported")
        } else if ksyms.contains(&name) {
            format!("extern {name} is a __ksym (kernel symbol) extern, which bpfpoly cannot resolve; only __kconfig externs are supported")
        } else if btf.is_none() {
            format!("extern {name} cannot be resolved: the object has no BTF (compile with clang -g) to say it is a __kconfig extern")
        } else {
            format!("extern {name} is not defined in the object and is not a __kconfig extern")
        });
    }
    for e in &found.kconfig {
        if let Err(problem) = check_name_and_kind(e) {
            problems.push(problem);
        }
    }
    if let Err(problem) = layout(&found) {
        problems.push(problem);
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems)
    }
}

/// Undefined symbols by name: (index, weak).
fn undefined_symbols(elf: &object::File<'_>) -> BTreeMap<String, (usize, bool)> {
    let mut undefined = BTreeMap::new();
    for sym in elf.symbols() {
        if sym.is_undefined() && sym.kind() != object::SymbolKind::Section {
            if let Ok(name) = sym.name() {
                if !name.is_empty() {
                    undefined.insert(name.to_owned(), (sym.index().0, sym.is_weak()));
                }
            }
        }
    }
    undefined
}

/// The undefined symbols the code's relocations refer to, in name order.
fn referenced_undefined(elf: &object::File<'_>) -> std::collections::BTreeSet<String> {
    let mut referenced = std::collections::BTreeSet::new();
    for section in elf.sections().filter(|s| s.kind() == SectionKind::Text) {
        for (_, rel) in section.relocations() {
            if let RelocationTarget::Symbol(index) = rel.target() {
                if let Ok(sym) = elf.symbol_by_index(index) {
                    if sym.is_undefined() {
                        if let Ok(name) = sym.name() {
                            referenced.insert(name.to_owned());
                        }
                    }
                }
            }
        }
    }
    referenced
}

fn u32_at_entry(btf: &RawBtf<'_>, datasec: &btf_raw::Record, n: usize) -> Option<u32> {
    btf_raw::u32_at(btf.bytes, btf_raw::datasec_entry(datasec, n))
}

fn kconfig_vars(
    btf: &RawBtf<'_>,
    datasec: &btf_raw::Record,
    undefined: &BTreeMap<String, (usize, bool)>,
    out: &mut Vec<Extern>,
    problems: &mut Vec<String>,
) {
    for n in 0..datasec.vlen {
        let Some(var) = u32_at_entry(btf, datasec, n).and_then(|id| btf.record(id)) else {
            problems.push(format!(
                "{KCONFIG_SECTION} entry {n} refers to a type that does not exist"
            ));
            continue;
        };
        let name = btf.name(var.name_off).unwrap_or("");
        if var.kind != kind::VAR || name.is_empty() {
            problems.push(format!(
                "{KCONFIG_SECTION} entry {n} is not a named VAR (BTF kind {})",
                var.kind
            ));
            continue;
        }
        let Some(&(symbol, weak)) = undefined.get(name) else {
            problems.push(format!(
                "extern {name} ({KCONFIG_SECTION}) has no undefined ELF symbol of that name"
            ));
            continue;
        };
        let (kind, size) = classify(btf, var.size_or_type);
        out.push(Extern {
            name: name.to_owned(),
            section: KCONFIG_SECTION.to_owned(),
            type_name: kind.describe(),
            weak,
            size,
            kind,
            symbol,
            entry: n,
        });
    }
}

/// libbpf's `find_kcfg_type`: the kind and size of a BTF type.
fn classify(btf: &RawBtf<'_>, type_id: u32) -> (Kind, u32) {
    classify_at(btf, type_id, 0)
}

/// `classify` of an array's element at `depth` arrays deep (hostile BTF can make an
/// array of itself).
fn classify_at(btf: &RawBtf<'_>, type_id: u32, depth: usize) -> (Kind, u32) {
    let Some((_, r)) = btf.strip(type_id).filter(|_| depth < 4) else {
        return (Kind::Unsupported("an unresolvable type".into()), 0);
    };
    let name = btf.name(r.name_off).unwrap_or("");
    match r.kind {
        kind::INT => {
            let bytes = r.size_or_type;
            let encoding = btf.extra(r, 0).map(|w| (w >> 24) & 0xf).unwrap_or(0);
            let signed = encoding & btf_raw::INT_SIGNED != 0;
            let kind = if encoding & btf_raw::INT_BOOL != 0 {
                if bytes == 1 {
                    Kind::Bool
                } else {
                    Kind::Unsupported(format!("a {bytes}-byte bool"))
                }
            } else if bytes == 1 {
                Kind::Char { signed }
            } else if matches!(bytes, 2 | 4 | 8) {
                Kind::Int { bytes, signed }
            } else {
                Kind::Unsupported(format!("a {bytes}-byte integer"))
            };
            (kind, bytes)
        }
        kind::ENUM | kind::ENUM64 if name == "libbpf_tristate" => {
            let bytes = r.size_or_type;
            if matches!(bytes, 4 | 8) {
                (Kind::Tristate { bytes }, bytes)
            } else {
                (Kind::Unsupported(format!("a {bytes}-byte tristate")), bytes)
            }
        }
        kind::ENUM | kind::ENUM64 => (
            Kind::Unsupported(format!("enum {name} (only enum libbpf_tristate)")),
            r.size_or_type,
        ),
        kind::ARRAY => {
            let elem = btf.extra(r, 0).unwrap_or(0);
            let len = btf.extra(r, 2).unwrap_or(0);
            match classify_at(btf, elem, depth + 1).0 {
                Kind::Char { .. } if len > 0 => (Kind::CharArray { len }, len),
                _ => (
                    Kind::Unsupported("an array that is not a char array".into()),
                    0,
                ),
            }
        }
        kind::STRUCT => (Kind::Unsupported(format!("struct {name}")), 0),
        kind::UNION => (Kind::Unsupported(format!("union {name}")), 0),
        kind::PTR => (Kind::Unsupported("a pointer".into()), 0),
        other => (Kind::Unsupported(format!("BTF kind {other}")), 0),
    }
}

/// What libbpf checks before reading any value: a type it can fill, a name it knows.
fn check_name_and_kind(e: &Extern) -> Result<(), String> {
    let name = &e.name;
    if let Kind::Unsupported(what) = &e.kind {
        return Err(format!(
            "extern {name} (__kconfig) is {what}, which cannot hold a kernel config value (bool, char, enum libbpf_tristate, an integer or a char array)"
        ));
    }
    let is_tri = matches!(
        e.kind,
        Kind::Bool | Kind::Tristate { .. } | Kind::Char { .. }
    );
    let is_num = matches!(e.kind, Kind::Int { .. } | Kind::Char { .. });
    match name.as_str() {
        "LINUX_KERNEL_VERSION" if !is_num => Err(format!(
            "extern {name} must be an integer (u32), not {}",
            e.type_name
        )),
        "LINUX_HAS_BPF_COOKIE" | "LINUX_HAS_SYSCALL_WRAPPER" if !is_tri => Err(format!(
            "extern {name} must be a bool, not {}",
            e.type_name
        )),
        "LINUX_KERNEL_VERSION" | "LINUX_HAS_BPF_COOKIE" | "LINUX_HAS_SYSCALL_WRAPPER" => Ok(()),
        n if n.starts_with("CONFIG_") => Ok(()),
        n if n.starts_with("LINUX_") && e.weak => Ok(()),
        _ => Err(format!(
            "extern {name} (__kconfig) is not a name the loader knows: CONFIG_*, LINUX_KERNEL_VERSION, LINUX_HAS_BPF_COOKIE, LINUX_HAS_SYSCALL_WRAPPER, or a __weak LINUX_*"
        )),
    }
}

/// Whether resolving `externs` needs the kernel config.
pub fn needs_config(externs: &Externs) -> bool {
    externs
        .kconfig
        .iter()
        .any(|e| e.name.starts_with("CONFIG_"))
}

/// Whether resolving `externs` needs the kernel's BPF features.
pub fn needs_features(externs: &Externs) -> bool {
    externs
        .kconfig
        .iter()
        .any(|e| e.name.starts_with("LINUX_HAS_"))
}

/// The value of every extern, as bytes of its size, from `facts`. Every extern whose
/// value cannot be had is a problem naming it.
pub fn values(externs: &Externs, facts: &KernelFacts) -> Result<Vec<Vec<u8>>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for e in &externs.kconfig {
        match value(e, facts) {
            Ok(v) => out.push(v),
            Err(p) => problems.push(format!("extern {}: {p}", e.name)),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Zero values (the layout does not depend on them): what `inspect` parses.
pub fn zero_values(externs: &Externs) -> Vec<Vec<u8>> {
    externs
        .kconfig
        .iter()
        .map(|e| vec![0; e.size as usize])
        .collect()
}

fn value(e: &Extern, facts: &KernelFacts) -> Result<Vec<u8>, String> {
    let zero = || Ok(vec![0; e.size as usize]);
    match e.name.as_str() {
        "LINUX_KERNEL_VERSION" => encode_number(&e.kind, u64::from(facts.kernel_version())),
        "LINUX_HAS_BPF_COOKIE" => encode_tristate(&e.kind, yes_no(facts.has_bpf_cookie()?)),
        "LINUX_HAS_SYSCALL_WRAPPER" => {
            encode_tristate(&e.kind, yes_no(facts.has_syscall_wrapper()?))
        }
        name if name.starts_with("CONFIG_") => match facts.config() {
            Err(why) if e.weak => {
                let _ = why;
                zero()
            }
            Err(why) => Err(format!("the kernel config is not available ({why})")),
            Ok(config) => match config.values.get(name) {
                None if e.weak => zero(),
                None => Err(format!(
                    "{name} is not set in {} (declare it __weak to default to 0)",
                    config.source
                )),
                Some(raw) => encode(&e.kind, raw).map_err(|p| {
                    format!("{name}={raw} (from {}) does not fit: {p}", config.source)
                }),
            },
        },
        _ => zero(), // a weak LINUX_* name libbpf does not know either
    }
}

fn yes_no(b: bool) -> char {
    if b {
        'y'
    } else {
        'n'
    }
}

/// The object (8-byte aligned ELF bytes) with its `__kconfig` externs filled from
/// `facts` and its libbpf-only section names renamed, or `None` when it needs neither. Each problem names its extern.
pub fn resolve_object(bytes: &[u8], facts: &KernelFacts) -> Result<Option<Vec<u8>>, Vec<String>> {
    let file = object::File::parse(bytes).map_err(|e| vec![format!("malformed ELF: {e}")])?;
    let externs = externs(&file)?;
    if !elf::needs_rewrite(&file, &externs) {
        return Ok(None);
    }
    let values = values(&externs, facts)?;
    elf::resolve(bytes, &externs, &values)
        .map(Some)
        .map_err(|e| vec![e])
}

#[cfg(test)]
mod tests;
