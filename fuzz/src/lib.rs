//! Coverage-guided fuzz targets for what the agent reads from untrusted bytecode sources,
//! run by AFL++ through the `afl` crate on stable Rust (`make fuzz`, e2e/fuzz/fuzz-afl.sh).
//! Each function here is one target's whole body; the binaries in `src/bin/` hand it
//! AFL's input. The same functions replay a saved input outside AFL (the binaries read
//! stdin when AFL is not there), so a crash reproduces with `TARGET < input`.
//!
//! A panic anywhere is a finding: `afl::fuzz!` turns it into an abort before any
//! `catch_unwind` (the loader's own included) can hide it.

use std::sync::OnceLock;

use bpfpoly_agent::inspect::inspect_bytes;
use bpfpoly_agent::kconfig::{self, system::parse_config, KernelFacts};
use bpfpoly_agent::loader::object::check::{check_handler_object, check_variant, resolve_auto};
use bpfpoly_agent::loader::object::{self, Mechanism, ObjectInfo, ProgramKind, Scalar};
use bpfpoly_crds::program::{Attach, ConfigType, Dispatch, Variant};
use bpfpoly_crds::state::ResolvedConfig;
use serde_json::json;

/// Target `inspect`: `bpfpoly-agent inspect` and the first step of every fetch (ELF and
/// BTF checks, `__kconfig` externs and the rewrite, aya's parser, globals and types).
pub fn inspect(data: &[u8]) {
    let _ = inspect_bytes(data);
}

/// Target `object_check`: the loader's object check before anything is loaded, as
/// `Loader::apply` and `bpfpoly-agent verify` run it: the loader's `inspect`, the
/// variant check against a fixed custom resource (the built-in classifier's) and
/// against one made from the object itself (every program attached by its kind, every
/// scalar global as config, a dispatch over its PROG_ARRAY and slots) under each
/// dispatch mechanism, the freplace handler-object check, and the `__kconfig`
/// resolution with a fixed kernel's values (the bytes aya is then given).
pub fn object_check(data: &[u8]) {
    let Ok(info) = object::inspect(data) else {
        return;
    };
    let fixed = classifier();
    let auto = resolve_auto(&info, &fixed.dispatch, false);
    let _ = check_variant(
        &info,
        &fixed.variant,
        &fixed.config,
        Some((&fixed.dispatch, auto)),
    );
    let own = from_object(&info, data);
    for mechanism in [Mechanism::TailCall, Mechanism::Static, Mechanism::Freplace] {
        let _ = check_variant(
            &info,
            &own.variant,
            &own.config,
            Some((&own.dispatch, mechanism)),
        );
    }
    let _ = check_variant(&info, &own.variant, &own.config, None);
    let _ = check_handler_object(&info, &own.dispatch);
    let _ = resolve_auto(&info, &own.dispatch, true);
    KERNEL.with(|facts| {
        let _ = kconfig::resolve_object(data, facts);
    });
}

/// A variant, its resolved config and its dispatch table.
pub struct Check {
    pub variant: Variant,
    pub config: Vec<ResolvedConfig>,
    pub dispatch: Dispatch,
}

/// The built-in classifier's custom resource (what `make run` applies).
fn classifier() -> &'static Check {
    static CHECK: OnceLock<Check> = OnceLock::new();
    CHECK.get_or_init(|| Check {
        variant: parse(json!({
            "name": "v",
            "bytecode": {"builtin": "packet-classifier-xdp"},
            "programs": [
                {"name": "classify", "attach": {"xdp": {"interfaces": ["eth0"]}}},
                {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
            ]
        })),
        config: parse(json!([
            {"name": "count_bytes", "type": "bool", "value": "true"},
            {"name": "vlan_aware", "type": "bool", "value": "true"}
        ])),
        dispatch: parse(json!({
            "entry": "classify",
            "slots": [{"key": 6, "handler": "handle_tcp"}, {"key": 17, "handler": "handle_udp"},
                      {"key": 1, "handler": "handle_icmp"}]
        })),
    })
}

fn parse<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("the fuzz target's fixed custom resource parses")
}

/// The attachment a program of `kind` takes (none for handlers and other kinds).
fn attach_for(kind: ProgramKind) -> Option<Attach> {
    static ATTACH: OnceLock<Vec<(ProgramKind, Attach)>> = OnceLock::new();
    let table = ATTACH.get_or_init(|| {
        [
            (ProgramKind::Xdp, json!({"xdp": {"interfaces": ["eth0"]}})),
            (
                ProgramKind::Classifier,
                json!({"tc": {"interfaces": ["eth0"]}}),
            ),
            (
                ProgramKind::TracePoint,
                json!({"tracepoint": {"category": "sched", "name": "sched_switch"}}),
            ),
            (
                ProgramKind::TpBtf,
                json!({"tpBtf": {"name": "sched_switch"}}),
            ),
            (
                ProgramKind::RawTracePoint,
                json!({"rawTracepoint": {"name": "sys_enter"}}),
            ),
            (
                ProgramKind::KProbe,
                json!({"kprobe": {"function": "do_sys_openat2"}}),
            ),
            (
                ProgramKind::FEntry,
                json!({"fentry": {"function": "do_sys_openat2"}}),
            ),
            (
                ProgramKind::FExit,
                json!({"fexit": {"function": "do_sys_openat2"}}),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, parse(v)))
        .collect()
    });
    table
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, a)| a.clone())
}

/// A check made from the object itself, so that objects other than the classifier
/// reach the end of the check. One byte of a hash of the input varies it (a config
/// type one size off, a program attached as the wrong kind), so both answers are
/// reached from every object.
fn from_object(info: &ObjectInfo, data: &[u8]) -> Check {
    let salt = data.iter().fold(0u8, |h, b| h.rotate_left(1) ^ b);
    let mut programs: Vec<serde_json::Value> = Vec::new();
    let mut entry = None;
    for (i, (name, &kind)) in info.programs.iter().enumerate() {
        let kind = if salt & 7 == 1 && i == 0 {
            ProgramKind::Xdp
        } else {
            kind
        };
        let mut p = json!({ "name": name });
        if let Some(a) = attach_for(kind) {
            entry.get_or_insert_with(|| name.clone());
            p["attach"] = serde_json::to_value(a).unwrap_or_default();
        }
        programs.push(p);
    }
    if programs.is_empty() {
        programs.push(json!({"name": "none"}));
    }
    let config: Vec<ResolvedConfig> = info
        .globals
        .iter()
        .filter_map(|(name, g)| {
            let t = match (&g.scalar, g.size) {
                (Scalar::Bool, _) => ConfigType::Bool,
                (Scalar::Int { signed: false, .. }, 1) => ConfigType::U8,
                (Scalar::Int { signed: false, .. }, 2) => ConfigType::U16,
                (Scalar::Int { signed: false, .. }, 4) => ConfigType::U32,
                (Scalar::Int { signed: true, .. }, 4) => ConfigType::I32,
                (Scalar::Int { signed: false, .. }, 8) => ConfigType::U64,
                (Scalar::Int { signed: true, .. }, 8) => ConfigType::I64,
                _ if salt & 7 == 2 => ConfigType::U32,
                _ => return None,
            };
            Some(ResolvedConfig {
                name: name.clone(),
                type_: t,
                value: "1".into(),
                fell_back: false,
                reason: None,
            })
        })
        .collect();
    let table = info
        .maps
        .iter()
        .find(|(_, t)| t.as_str() == object::MAP_TYPE_PROG_ARRAY)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| "jump_table".into());
    let slots: Vec<serde_json::Value> = info
        .programs
        .keys()
        .filter(|n| Some(*n) != entry.as_ref())
        .enumerate()
        .map(|(key, handler)| json!({"key": key, "handler": handler}))
        .collect();
    Check {
        variant: parse(json!({
            "name": "own",
            "bytecode": {"builtin": "fuzz"},
            "programs": programs,
        })),
        config,
        dispatch: parse(json!({
            "entry": entry.unwrap_or_else(|| "none".into()),
            "table": table,
            "slots": slots,
        })),
    }
}

thread_local! {
    /// A fixed kernel for `__kconfig` resolution: no files read while fuzzing.
    static KERNEL: KernelFacts = KernelFacts::fixed(
        "6.1.0-fuzz",
        parse_config(
            "CONFIG_BPF=y\nCONFIG_BPF_SYSCALL=y\nCONFIG_HZ=250\nCONFIG_MODULES=y\n\
             CONFIG_NET_SCH_INGRESS=m\nCONFIG_LOCALVERSION=\"-fuzz\"\n# CONFIG_KPROBES is not set\n",
            "fuzz",
        ),
        true,
        true,
    );
}
