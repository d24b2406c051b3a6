//! `bpfpoly-agent verify`: does this object verify on this node? Every program (or the
//! named ones) is loaded into the kernel through the agent's own path: the same object
//! checks, `__kconfig` resolution, config writing into `.rodata` and map creation as a
//! `BpfPolyProgram` gets. Nothing is attached or pinned; dropping the object at the
//! end unloads every program and map.

use std::time::Instant;

use aya::programs::Program;
use bpfpoly_crds::program::ConfigType;
use serde::Serialize;

use crate::kconfig::KernelFacts;

use super::{
    candidate::{self, log_tail, DispatchGlobals, Kernel, LoadError},
    error::chain,
    object::{self, ObjectInfo, Scalar},
};

/// What to verify and against what.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Programs by C function name; empty means all.
    pub programs: Vec<String>,
    /// `NAME=VALUE` writes into `.rodata`/`.data` globals, typed by their BTF.
    pub config: Vec<(String, String)>,
    /// Release for `LINUX_KERNEL_VERSION` (default: the running kernel's).
    pub kernel_release: Option<String>,
    /// Kernel config for `CONFIG_*` externs (default: the running kernel's).
    pub kconfig_file: Option<std::path::PathBuf>,
}

/// Where a program was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Opening the object: externs, BTF, maps (every program fails together).
    Open,
    /// `BPF_PROG_LOAD`: the verifier, or the kernel before it.
    Load,
}

/// One program's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramResult {
    /// C function name.
    pub name: String,
    /// ELF section.
    pub section: String,
    /// Program type (bpftool name).
    #[serde(rename = "type")]
    pub program_type: String,
    /// Verified or refused.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Verified, with the kernel's numbers, or refused, with why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Outcome {
    /// Loaded.
    #[serde(rename_all = "camelCase")]
    Verified {
        /// Instructions the verifier processed (the kernel's `verified_insns`).
        instructions: Option<u32>,
        /// Wall time of the load (verification), milliseconds.
        verify_ms: f64,
    },
    /// Not loaded.
    #[serde(rename_all = "camelCase")]
    Refused {
        /// Where.
        stage: Stage,
        /// Why, with the verifier's line that says so.
        reason: String,
        /// The end of the verifier log.
        verifier_log: Option<String>,
    },
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// The kernel release the externs were resolved for.
    pub kernel_release: String,
    /// Per program, in name order.
    pub programs: Vec<ProgramResult>,
}

impl VerifyReport {
    /// Whether every program verified.
    pub fn all_verified(&self) -> bool {
        self.programs
            .iter()
            .all(|p| matches!(p.outcome, Outcome::Verified { .. }))
    }
}

/// Verifies `bytes` on this kernel. `Err` is an object or command-line problem found
/// before the kernel is asked (every problem listed).
pub fn verify(bytes: &[u8], opts: &VerifyOptions) -> Result<VerifyReport, Vec<String>> {
    let info = object::inspect(bytes).map_err(|e| vec![e.to_string()])?;
    let inspected = crate::inspect::inspect_bytes(bytes).map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();
    for name in &opts.programs {
        if !info.programs.contains_key(name) {
            let all: Vec<&str> = info.programs.keys().map(String::as_str).collect();
            problems.push(format!(
                "program {name:?} not found in the object (it has: {})",
                all.join(", ")
            ));
        }
    }
    let config = config_values(&info, &opts.config, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let selected: Vec<&crate::inspect::ProgramInfo> = inspected
        .programs
        .iter()
        .filter(|p| opts.programs.is_empty() || opts.programs.contains(&p.name))
        .collect();

    let facts = KernelFacts::running()
        .with_release(opts.kernel_release.clone())
        .with_config_file(opts.kconfig_file.clone());
    let kernel_release = facts.release();
    let mut kernel = Kernel::new().with_facts(facts);
    let result = |p: &crate::inspect::ProgramInfo, outcome| ProgramResult {
        name: p.name.clone(),
        section: p.section.clone(),
        program_type: p.program_type.clone(),
        outcome,
    };
    let mut ebpf = match candidate::open_object(
        &mut kernel,
        (bytes, &info),
        &config,
        DispatchGlobals {
            mode: None,
            mask: None,
        },
        &[],
        &[],
    ) {
        Ok(ebpf) => ebpf,
        Err(f) => {
            let programs = selected
                .iter()
                .map(|p| {
                    result(
                        p,
                        Outcome::Refused {
                            stage: Stage::Open,
                            reason: f.reason.clone(),
                            verifier_log: f.verifier_log.clone(),
                        },
                    )
                })
                .collect();
            return Ok(VerifyReport {
                kernel_release,
                programs,
            });
        }
    };
    let mut programs = Vec::new();
    for p in selected {
        let target = p.section.split_once('/').map(|(_, t)| t).unwrap_or("");
        let start = Instant::now();
        let loaded = load(&mut ebpf, &p.name, target, &mut kernel);
        let verify_ms = start.elapsed().as_secs_f64() * 1000.0;
        let outcome = match loaded {
            Ok(instructions) => Outcome::Verified {
                instructions,
                verify_ms,
            },
            Err(e) => Outcome::Refused {
                stage: Stage::Load,
                reason: e.reason(&format!("program {:?}", p.name)),
                verifier_log: log_tail(&e.log),
            },
        };
        programs.push(result(p, outcome));
    }
    drop(ebpf); // unloads every program and map
    Ok(VerifyReport {
        kernel_release,
        programs,
    })
}

/// `NAME=VALUE` pairs typed by their global's BTF type.
fn config_values(
    info: &ObjectInfo,
    pairs: &[(String, String)],
    problems: &mut Vec<String>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        let Some(global) = info.globals.get(name) else {
            problems.push(format!(
                "--config {name}: no such global in the object's .rodata/.data/.bss"
            ));
            continue;
        };
        let t = match global.scalar {
            Scalar::Bool => Some(ConfigType::Bool),
            Scalar::Int { bytes, signed } => match (bytes, signed) {
                (1, false) => Some(ConfigType::U8),
                (2, false) => Some(ConfigType::U16),
                (4, false) => Some(ConfigType::U32),
                (8, false) => Some(ConfigType::U64),
                (4, true) => Some(ConfigType::I32),
                (8, true) => Some(ConfigType::I64),
                _ => None,
            },
            Scalar::Other(_) => None,
        };
        let Some(t) = t else {
            problems.push(format!(
                "--config {name}: the global is {}, which config cannot write (bool, u8-u64, i32, i64)",
                global.scalar
            ));
            continue;
        };
        match t.parse_value(value) {
            Ok(v) => out.push((name.clone(), v.to_ne_bytes())),
            Err(e) => problems.push(format!("--config {name}: {e}")),
        }
    }
    out
}

/// Loads one program of any type aya loads; BTF-attached types get their target from
/// the section (`tp_btf/sched_switch`). Returns the verified instruction count.
fn load(
    ebpf: &mut aya::Ebpf,
    name: &str,
    target: &str,
    kernel: &mut Kernel,
) -> Result<Option<u32>, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::other(format!("program {name:?} not in the object")))?;
    let needs_target = || {
        LoadError::other(
            "it needs an attach target in its section name (tp_btf/NAME, fentry/FUNCTION...)",
        )
    };
    let result = match program {
        Program::BtfTracePoint(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::FEntry(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::FExit(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::Lsm(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::LsmCgroup(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::Iter(p) if !target.is_empty() => p.load(target, kernel.btf_ref()?),
        Program::BtfTracePoint(_)
        | Program::FEntry(_)
        | Program::FExit(_)
        | Program::Lsm(_)
        | Program::LsmCgroup(_)
        | Program::Iter(_) => return Err(needs_target()),
        Program::Extension(_) => {
            return Err(LoadError::other(
                "freplace loads against a target program, which verify does not have (it loads with its entry object)",
            ))
        }
        Program::KProbe(p) => p.load(),
        Program::UProbe(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::SocketFilter(p) => p.load(),
        Program::ReusePortSocketFilter(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::CgroupSysctl(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::LircMode2(p) => p.load(),
        Program::PerfEvent(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupDevice(p) => p.load(),
        Program::FlowDissector(p) => p.load(),
        Program::SkReuseport(p) => p.load(),
    };
    result.map_err(LoadError::from_program)?;
    Ok(program
        .info()
        .map_err(|e| LoadError::other(format!("reading the program info: {}", chain(&e))))?
        .verified_instruction_count())
}
