//! Semantic validation of a `BpfPolyProgram`: everything the schema cannot say on a
//! Kubernetes 1.20 API server. It returns *all* problems, each with its path and the
//! offending value, so a user fixes them in one round.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::program::{
    Attach, BpfPolyProgram, BpfPolyProgramSpec, Bytecode, ConfigField, Dispatch, ProgramRef,
    Requirements, Rollout, Variant,
};
use crate::requirement::{
    parse_enum_value, parse_field, parse_function, parse_helper, parse_map_type,
    parse_program_type, parse_type, KernelRequirement,
};

/// One problem, at a path such as `spec.dispatch.slots[1].handler`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field.
    pub path: String,
    /// What is wrong, quoting the offending value.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects problems as validation walks the object.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_c_ident(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= 128
        && matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

/// Validates a whole object: its name and its spec.
pub fn validate_program(obj: &BpfPolyProgram) -> Vec<FieldError> {
    let mut p = Problems::default();
    match obj.metadata.name.as_deref() {
        None => p.add("metadata.name", "is required"),
        Some(n) if !is_dns_label(n) => p.add(
            "metadata.name",
            format!("{n:?} must be a DNS label (lowercase letters, digits, '-', at most 63): it names the bpffs directory on every node"),
        ),
        Some(_) => {}
    }
    let mut errors = p.0;
    errors.extend(validate_spec(&obj.spec));
    errors
}

/// What is allowed but probably not meant: dead parts of a spec that do no harm. The
/// program runs; `validate` prints these and the operator announces them.
pub fn spec_warnings(spec: &BpfPolyProgramSpec) -> Vec<FieldError> {
    let mut p = Problems::default();
    for (i, c) in spec.config.iter().enumerate() {
        if c.fallback.is_some() && c.requires.is_none() {
            p.add(
                format!("spec.config[{i}].fallback"),
                "is never used: the field has no requires, so its value is always written",
            );
        }
    }
    p.0
}

/// Validates a spec. Paths start at `spec.`.
pub fn validate_spec(spec: &BpfPolyProgramSpec) -> Vec<FieldError> {
    let mut p = Problems::default();
    check_variants(&mut p, spec);
    if let Some(d) = &spec.dispatch {
        check_dispatch(&mut p, spec, d);
    }
    check_config(&mut p, &spec.config);
    check_rollout(&mut p, &spec.rollout);
    p.0
}

/// `spec.variants`: names, bytecode, programs and requirements of each variant.
fn check_variants(p: &mut Problems, spec: &BpfPolyProgramSpec) {
    if spec.variants.is_empty() {
        p.add("spec.variants", "at least one variant is required");
    }
    let handlers: BTreeSet<&str> = spec
        .dispatch
        .iter()
        .flat_map(|d| d.slots.iter().map(|s| s.handler.as_str()))
        .collect();
    let mut names = BTreeMap::new();
    for (i, v) in spec.variants.iter().enumerate() {
        let path = format!("spec.variants[{i}]");
        if !is_dns_label(&v.name) {
            p.add(
                format!("{path}.name"),
                format!(
                    "{:?} must be a DNS label (lowercase letters, digits, '-')",
                    v.name
                ),
            );
        }
        if let Some(first) = names.insert(v.name.as_str(), i) {
            p.add(
                format!("{path}.name"),
                format!("{:?} duplicates spec.variants[{first}].name", v.name),
            );
        }
        check_bytecode(p, &format!("{path}.bytecode"), &v.bytecode);
        if let Some(hb) = &v.handler_bytecode {
            check_bytecode(p, &format!("{path}.handlerBytecode"), hb);
        }
        check_programs(p, &path, &v.programs, &handlers);
        check_requirements(p, &format!("{path}.requires"), &v.requires);
        if v.dispatch_mechanism.is_some() && spec.dispatch.is_none() {
            p.add(
                format!("{path}.dispatchMechanism"),
                "is set but spec.dispatch is absent",
            );
        }
    }
}

/// `spec.variants[i].programs`: C names, no duplicates, an attach unless a dispatch handler.
fn check_programs(
    p: &mut Problems,
    path: &str,
    programs: &[ProgramRef],
    handlers: &BTreeSet<&str>,
) {
    if programs.is_empty() {
        p.add(
            format!("{path}.programs"),
            "at least one program is required",
        );
    }
    let mut progs = BTreeMap::new();
    for (j, prog) in programs.iter().enumerate() {
        let ppath = format!("{path}.programs[{j}]");
        if !is_c_ident(&prog.name) {
            p.add(
                format!("{ppath}.name"),
                format!("{:?} is not a C function name", prog.name),
            );
        }
        if let Some(first) = progs.insert(prog.name.as_str(), j) {
            p.add(
                format!("{ppath}.name"),
                format!("{:?} duplicates {path}.programs[{first}].name", prog.name),
            );
        }
        match &prog.attach {
            Some(a) => check_attach(p, &format!("{ppath}.attach"), a),
            None if handlers.contains(prog.name.as_str()) => {}
            None => p.add(
                format!("{ppath}.attach"),
                format!(
                    "program {:?} has no attach and is not a dispatch handler",
                    prog.name
                ),
            ),
        }
    }
}

/// `spec.dispatch`: the entry and table names, the entry in every dispatching variant, and
/// the slots.
fn check_dispatch(p: &mut Problems, spec: &BpfPolyProgramSpec, d: &Dispatch) {
    if !is_c_ident(&d.entry) {
        p.add(
            "spec.dispatch.entry",
            format!("{:?} is not a C function name", d.entry),
        );
    }
    if !is_c_ident(&d.table) {
        p.add(
            "spec.dispatch.table",
            format!("{:?} is not a map name", d.table),
        );
    }
    let dispatching: Vec<&Variant> = spec
        .variants
        .iter()
        .filter(|v| v.programs.iter().any(|pr| pr.name == d.entry))
        .collect();
    if dispatching.is_empty() && !spec.variants.is_empty() {
        p.add(
            "spec.dispatch.entry",
            format!("{:?} is not a program of any variant", d.entry),
        );
    }
    for v in &dispatching {
        let entry_attached = v
            .programs
            .iter()
            .any(|pr| pr.name == d.entry && pr.attach.is_some());
        if !entry_attached {
            p.add(
                "spec.dispatch.entry",
                format!("{:?} has no attach in variant {:?}", d.entry, v.name),
            );
        }
    }
    check_slots(p, d, &dispatching);
}

/// `spec.dispatch.slots`: keys in range and unique, handlers that every dispatching variant has.
fn check_slots(p: &mut Problems, d: &Dispatch, dispatching: &[&Variant]) {
    if d.slots.len() > 256 {
        p.add(
            "spec.dispatch.slots",
            format!("{} slots; at most 256", d.slots.len()),
        );
    }
    let mut keys = BTreeMap::new();
    for (i, slot) in d.slots.iter().enumerate() {
        let spath = format!("spec.dispatch.slots[{i}]");
        if slot.key > 255 {
            p.add(
                format!("{spath}.key"),
                format!("{} is out of range 0..=255", slot.key),
            );
        }
        if let Some(first) = keys.insert(slot.key, i) {
            p.add(
                format!("{spath}.key"),
                format!("{} duplicates spec.dispatch.slots[{first}].key", slot.key),
            );
        }
        if slot.handler == d.entry {
            p.add(
                format!("{spath}.handler"),
                format!("{:?} is the entry program itself", slot.handler),
            );
        }
        for v in dispatching {
            if !v.programs.iter().any(|pr| pr.name == slot.handler) {
                p.add(
                    format!("{spath}.handler"),
                    format!(
                        "{:?} is not a program of variant {:?}",
                        slot.handler, v.name
                    ),
                );
            }
        }
    }
}

/// `spec.config`: C names, no duplicates, values and fallbacks that parse as their type.
fn check_config(p: &mut Problems, config: &[ConfigField]) {
    let mut cfg_names = BTreeMap::new();
    for (i, c) in config.iter().enumerate() {
        let path = format!("spec.config[{i}]");
        if !is_c_ident(&c.name) {
            p.add(
                format!("{path}.name"),
                format!("{:?} is not a C identifier", c.name),
            );
        }
        if let Some(first) = cfg_names.insert(c.name.as_str(), i) {
            p.add(
                format!("{path}.name"),
                format!("{:?} duplicates spec.config[{first}].name", c.name),
            );
        }
        if let Err(e) = c.type_.parse_value(&c.value) {
            p.add(format!("{path}.value"), e);
        }
        if let Some(fb) = &c.fallback {
            if let Err(e) = c.type_.parse_value(fb) {
                p.add(format!("{path}.fallback"), e);
            }
        }
        if let Some(r) = &c.requires {
            check_requirements(p, &format!("{path}.requires"), r);
        }
    }
}

/// `spec.rollout`: maxUnavailable, canary and the degraded ratio in range.
fn check_rollout(p: &mut Problems, r: &Rollout) {
    match &r.max_unavailable {
        IntOrString::Int(n) if *n < 1 => p.add(
            "spec.rollout.maxUnavailable",
            format!("{n} must be at least 1"),
        ),
        IntOrString::Int(_) => {}
        IntOrString::String(s) => {
            let ok = s
                .strip_suffix('%')
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| (1..=100).contains(&n));
            if !ok {
                p.add(
                    "spec.rollout.maxUnavailable",
                    format!("{s:?} must be an integer or a percentage from 1% to 100%"),
                );
            }
        }
    }
    if r.canary > 1000 {
        p.add("spec.rollout.canary", format!("{} is above 1000", r.canary));
    }
    if !(0.0..=1.0).contains(&r.pause_on_degraded_ratio) {
        p.add(
            "spec.rollout.pauseOnDegradedRatio",
            format!("{} must be between 0 and 1", r.pause_on_degraded_ratio),
        );
    }
}

fn check_bytecode(p: &mut Problems, path: &str, b: &Bytecode) {
    let set = [
        b.builtin.is_some(),
        b.config_map.is_some(),
        b.path.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        p.add(
            path,
            format!("exactly one of builtin, configMap or path must be set; found {set}"),
        );
    }
    if let Some(sha) = &b.sha256 {
        if !is_sha256(sha) {
            p.add(
                format!("{path}.sha256"),
                format!("{sha:?} is not 64 lowercase hex digits"),
            );
        }
    } else if b.config_map.is_some() || b.path.is_some() {
        p.add(
            format!("{path}.sha256"),
            "is required for configMap and path bytecode",
        );
    }
    if let Some(name) = &b.builtin {
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            p.add(
                format!("{path}.builtin"),
                format!("{name:?} is not a builtin name"),
            );
        }
    }
    if let Some(cm) = &b.config_map {
        if !is_dns_label(&cm.namespace) {
            p.add(
                format!("{path}.configMap.namespace"),
                format!("{:?} is not a namespace name", cm.namespace),
            );
        }
        if cm.name.is_empty() || cm.name.len() > 253 {
            p.add(
                format!("{path}.configMap.name"),
                format!("{:?} is not a ConfigMap name", cm.name),
            );
        }
        if cm.key.is_empty() || cm.key.len() > 253 {
            p.add(
                format!("{path}.configMap.key"),
                format!("{:?} is not a ConfigMap key", cm.key),
            );
        }
    }
    if let Some(file) = &b.path {
        if !file.starts_with('/') {
            p.add(
                format!("{path}.path"),
                format!("{file:?} must be an absolute path"),
            );
        }
        if file.split('/').any(|c| c == "..") || file.contains('\0') {
            p.add(
                format!("{path}.path"),
                format!("{file:?} must not contain '..' or NUL"),
            );
        }
    }
}

fn check_attach(p: &mut Problems, path: &str, a: &Attach) {
    let kinds: Vec<&str> = [
        ("tpBtf", a.tp_btf.is_some()),
        ("tracepoint", a.tracepoint.is_some()),
        ("rawTracepoint", a.raw_tracepoint.is_some()),
        ("kprobe", a.kprobe.is_some()),
        ("fentry", a.fentry.is_some()),
        ("fexit", a.fexit.is_some()),
        ("xdp", a.xdp.is_some()),
        ("tc", a.tc.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| *k)
    .collect();
    if kinds.len() != 1 {
        p.add(
            path,
            format!(
                "exactly one attach kind must be set; found {} ({})",
                kinds.len(),
                kinds.join(", ")
            ),
        );
    }
    let ident = |p: &mut Problems, field: String, v: &str| {
        if !is_c_ident(v) {
            p.add(field, format!("{v:?} is not a valid name"));
        }
    };
    if let Some(t) = &a.tp_btf {
        ident(p, format!("{path}.tpBtf.name"), &t.name);
    }
    if let Some(t) = &a.raw_tracepoint {
        ident(p, format!("{path}.rawTracepoint.name"), &t.name);
    }
    if let Some(t) = &a.tracepoint {
        ident(p, format!("{path}.tracepoint.category"), &t.category);
        ident(p, format!("{path}.tracepoint.name"), &t.name);
    }
    if let Some(k) = &a.kprobe {
        let f = k.function.split('.').next().unwrap_or_default();
        ident(p, format!("{path}.kprobe.function"), f);
        if k.offset > 65536 {
            p.add(
                format!("{path}.kprobe.offset"),
                format!("{} is above 65536", k.offset),
            );
        }
    }
    for (kind, f) in [("fentry", &a.fentry), ("fexit", &a.fexit)] {
        if let Some(f) = f {
            ident(p, format!("{path}.{kind}.function"), &f.function);
        }
    }
    let ifaces: [(&str, Option<&Vec<String>>); 2] = [
        ("xdp", a.xdp.as_ref().map(|x| &x.interfaces)),
        ("tc", a.tc.as_ref().map(|x| &x.interfaces)),
    ];
    for (kind, list) in ifaces {
        let Some(list) = list else { continue };
        if list.is_empty() {
            p.add(
                format!("{path}.{kind}.interfaces"),
                "at least one interface is required",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, name) in list.iter().enumerate() {
            if !is_ifname(name) {
                p.add(
                    format!("{path}.{kind}.interfaces[{i}]"),
                    format!("{name:?} is not an interface name (1-15 chars, no '/' or spaces)"),
                );
            }
            if !seen.insert(name) {
                p.add(
                    format!("{path}.{kind}.interfaces[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }
    }
}

fn check_requirements(p: &mut Problems, path: &str, r: &Requirements) {
    if let Some(k) = &r.kernel {
        if let Err(e) = KernelRequirement::parse(k) {
            p.add(format!("{path}.kernel"), e);
        }
    }
    type Check = fn(&str) -> Result<String, String>;
    let lists: [(&str, &Vec<String>, Check); 7] = [
        ("types", &r.types, parse_type),
        ("fields", &r.fields, parse_field),
        ("enumValues", &r.enum_values, parse_enum_value),
        ("functions", &r.functions, parse_function),
        ("programTypes", &r.program_types, |s| {
            parse_program_type(s).map(str::to_string)
        }),
        ("mapTypes", &r.map_types, |s| {
            parse_map_type(s).map(str::to_string)
        }),
        ("helpers", &r.helpers, |s| {
            parse_helper(s).map(str::to_string)
        }),
    ];
    for (field, list, check) in lists {
        for (i, item) in list.iter().enumerate() {
            if let Err(e) = check(item) {
                p.add(format!("{path}.{field}[{i}]"), e);
            }
        }
    }
}
