//! Offline explain: "will my program work on kernel X?" without a cluster.
//!
//! A platform engineer gives program files and the fleet's kernels, as profiles written by
//! `bpfpoly-agent profile` (or `kubectl get bnp NODE -o json`) or as raw BTF files. BTF is
//! answered by `bpfpoly-agent profile --btf-path`, the agent's own code, with nothing
//! re-implemented here; the decision is the operator's own [`decide`].
//!
//! Program types, map types and helpers are probed on a *running* kernel. For another
//! kernel's BTF the agent cannot probe them, so they are read from that BTF's
//! `enum bpf_prog_type`, `enum bpf_map_type` and `enum bpf_func_id` instead, and every trace
//! line built on them says so. A profile file whose probes did not come from its BTF's kernel
//! leaves them unknown: requirements on them are reported as pending, never as false.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bpfpoly_crds::requirement::{parse_helper, parse_map_type, parse_program_type, Query};
use bpfpoly_crds::select::{
    decide, program_queries, Check, Decision, FeatureSource, NodeFacts, Outcome,
};
use bpfpoly_crds::{BpfNodeProfileStatus, BpfPolyProgram};
use serde::{Deserialize, Serialize};

/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 16 << 20;

/// One kernel to explain against.
pub enum KernelInput {
    /// A profile file (JSON).
    Profile(PathBuf),
    /// A raw BTF file, with the release it belongs to.
    Btf {
        /// The BTF.
        path: PathBuf,
        /// Its kernel release (`uname -r` of that kernel).
        release: Option<String>,
    },
}

/// A kernel's facts, with where they came from.
pub struct Kernel {
    /// What the user named (a file).
    pub source: String,
    /// The facts decisions are made on.
    pub facts: NodeFacts,
    /// Notes on the facts (e.g. the agent's notes).
    pub notes: Vec<String>,
}

/// A profile file: `bpfpoly-agent profile` output, or a `BpfNodeProfile` object.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    status: Option<BpfNodeProfileStatus>,
    #[serde(flatten)]
    flat: BpfNodeProfileStatus,
    /// Absent in a `BpfNodeProfile` object: an agent publishes its own running kernel.
    #[serde(default)]
    btf_is_running_kernel: Option<bool>,
    #[serde(default)]
    notes: Vec<String>,
}

/// The `bpfpoly-agent profile --btf-path` answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentProfile {
    #[serde(flatten)]
    status: BpfNodeProfileStatus,
    btf_is_running_kernel: bool,
    #[serde(default)]
    notes: Vec<String>,
}

/// The BTF enum constant that says a kernel knows a program type, map type or helper.
fn feature_query(kind: &str, name: &str) -> Query {
    let constant = match kind {
        "prog" => format!("enum bpf_prog_type.BPF_PROG_TYPE_{}", name.to_uppercase()),
        "map" => format!("enum bpf_map_type.BPF_MAP_TYPE_{}", name.to_uppercase()),
        _ => format!(
            "enum bpf_func_id.BPF_FUNC_{}",
            name.strip_prefix("bpf_").unwrap_or(name)
        ),
    };
    Query::Enum(constant)
}

/// Program types, map types and helpers the programs mention.
#[derive(Default)]
struct Features {
    program_types: BTreeSet<&'static str>,
    map_types: BTreeSet<&'static str>,
    helpers: BTreeSet<&'static str>,
}

fn features(programs: &[BpfPolyProgram]) -> Features {
    let mut f = Features::default();
    for p in programs {
        let mut reqs: Vec<&bpfpoly_crds::program::Requirements> =
            p.spec.variants.iter().map(|v| &v.requires).collect();
        reqs.extend(p.spec.config.iter().filter_map(|c| c.requires.as_ref()));
        for v in &p.spec.variants {
            f.program_types
                .extend(bpfpoly_crds::select::variant_program_types(v));
        }
        for r in reqs {
            f.program_types.extend(
                r.program_types
                    .iter()
                    .filter_map(|t| parse_program_type(t).ok()),
            );
            f.map_types
                .extend(r.map_types.iter().filter_map(|t| parse_map_type(t).ok()));
            f.helpers
                .extend(r.helpers.iter().filter_map(|h| parse_helper(h).ok()));
        }
    }
    f
}

/// Every query the programs need, plus the feature enums when `with_features`.
fn queries(programs: &[BpfPolyProgram], with_features: bool) -> BTreeSet<Query> {
    let mut q: BTreeSet<Query> = programs
        .iter()
        .flat_map(|p| program_queries(&p.spec))
        // Helper answers are probes of a running kernel; from BTF they come from enums.
        .filter(|q| !matches!(q, Query::Helper { .. }))
        .collect();
    if with_features {
        let f = features(programs);
        q.extend(f.program_types.iter().map(|t| feature_query("prog", t)));
        q.extend(f.map_types.iter().map(|t| feature_query("map", t)));
        q.extend(f.helpers.iter().map(|h| feature_query("helper", h)));
    }
    q
}

/// Facts from another kernel's BTF: program types, map types and helpers from its enums.
fn facts_from_btf_enums(status: &BpfNodeProfileStatus, programs: &[BpfPolyProgram]) -> NodeFacts {
    let mut facts = NodeFacts::from_status(status);
    let f = features(programs);
    let known = |q: Query| status.answers.get(&q.to_string()).copied() == Some(true);
    let known_of = |kind: &str, types: &BTreeSet<&'static str>| -> BTreeSet<String> {
        types
            .iter()
            .filter(|t| known(feature_query(kind, t)))
            .map(|t| t.to_string())
            .collect()
    };
    facts.program_types = known_of("prog", &f.program_types);
    facts.map_types = known_of("map", &f.map_types);
    facts.observed_program_types.clear();
    facts.answers.retain(|k, _| !k.starts_with("helper:"));
    for q in programs.iter().flat_map(|p| program_queries(&p.spec)) {
        if let Query::Helper { helper, .. } = &q {
            let holds = known(feature_query("helper", helper));
            facts.answers.insert(q.to_string(), holds);
        }
    }
    facts.features = FeatureSource::BtfEnums;
    facts
}

/// Reads one profile file.
fn read_profile(path: &Path) -> Result<Kernel, String> {
    let text = read_bounded(path)?;
    let file: ProfileFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not a profile (bpfpoly-agent profile JSON or a BpfNodeProfile): {e}",
            path.display()
        )
    })?;
    let (status, running) = match file.kind.as_deref() {
        Some("BpfNodeProfile") => (
            file.status.ok_or_else(|| {
                format!("{}: the BpfNodeProfile has no status yet", path.display())
            })?,
            true,
        ),
        _ => (file.flat, file.btf_is_running_kernel.unwrap_or(true)),
    };
    if status.kernel.release.is_empty() {
        return Err(format!("{}: kernel.release is empty", path.display()));
    }
    let mut facts = NodeFacts::from_status(&status);
    let mut notes = file.notes;
    if !running {
        facts.features = FeatureSource::Unknown;
        facts.program_types.clear();
        facts.map_types.clear();
        facts.observed_program_types.clear();
        facts.answers.retain(|k, _| !k.starts_with("helper:"));
        notes.push("its probes ran on another kernel than its BTF's: program types, map types and helpers are unknown".into());
    }
    Ok(Kernel {
        source: path.display().to_string(),
        facts,
        notes,
    })
}

/// Answers a BTF file through `bpfpoly-agent profile --btf-path`.
fn profile_btf(
    agent: &Path,
    path: &Path,
    release: Option<&str>,
    programs: &[BpfPolyProgram],
) -> Result<Kernel, String> {
    let mut cmd = std::process::Command::new(agent);
    cmd.arg("profile").arg("--btf-path").arg(path);
    if let Some(r) = release {
        cmd.arg("--kernel-release").arg(r);
    }
    for q in queries(programs, true) {
        cmd.arg("--query").arg(q.to_string());
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {} (--agent-bin): {e}", agent.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {} profile failed: {}",
            path.display(),
            agent.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let p: AgentProfile = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{}: unexpected output of {} profile: {e}",
            path.display(),
            agent.display()
        )
    })?;
    let (facts, mut notes) = if p.btf_is_running_kernel {
        // The running kernel: its probes are the truth, as in the cluster.
        (NodeFacts::from_status(&p.status), Vec::new())
    } else {
        if release.is_none() {
            return Err(format!(
                "{}: this is not the running kernel's BTF: pass --kernel-release (the release of the kernel it belongs to)",
                path.display()
            ));
        }
        (
            facts_from_btf_enums(&p.status, programs),
            vec![
                "program types, map types and helpers are read from this BTF's enums, not probed"
                    .into(),
            ],
        )
    };
    notes.extend(
        p.notes
            .into_iter()
            .filter(|n| p.btf_is_running_kernel || !n.contains("probe")),
    );
    Ok(Kernel {
        source: path.display().to_string(),
        facts,
        notes,
    })
}

/// Loads every kernel the user named.
pub fn kernels(
    inputs: &[KernelInput],
    agent: &Path,
    programs: &[BpfPolyProgram],
) -> Result<Vec<Kernel>, String> {
    inputs
        .iter()
        .map(|k| match k {
            KernelInput::Profile(p) => read_profile(p),
            KernelInput::Btf { path, release } => {
                profile_btf(agent, path, release.as_deref(), programs)
            }
        })
        .collect()
}

/// Reads the programs of YAML files (multi-document), refusing any invalid one with every
/// problem and its path.
pub fn read_programs(files: &[PathBuf]) -> Result<Vec<BpfPolyProgram>, String> {
    let mut programs = Vec::new();
    let mut problems = Vec::new();
    for f in files {
        let text = read_bounded(f)?;
        for r in bpfpoly_crds::document::check_stream(&text) {
            for e in &r.errors {
                problems.push(format!(
                    "{}: {} (document {}): {e}",
                    f.display(),
                    r.object,
                    r.index
                ));
            }
        }
        if !problems.is_empty() {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v =
                serde_json::Value::deserialize(doc).map_err(|e| format!("{}: {e}", f.display()))?;
            if v.is_null() {
                continue;
            }
            programs.push(serde_json::from_value(v).map_err(|e| format!("{}: {e}", f.display()))?);
        }
    }
    if !problems.is_empty() {
        return Err(format!("invalid program(s):\n{}", problems.join("\n")));
    }
    if programs.is_empty() {
        return Err("no BpfPolyProgram in the given --program file(s)".into());
    }
    Ok(programs)
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(format!(
            "{}: {} bytes is above the {MAX_PROFILE_BYTES}-byte limit",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// The stable JSON form (`-o json`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// One entry per kernel, in the order given.
    pub kernels: Vec<KernelReport>,
}

/// One kernel's answers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelReport {
    /// The file the facts came from.
    pub source: String,
    /// Kernel release.
    pub release: String,
    /// `probed`, `btf-enums` or `unknown`: where program-type, map-type and helper facts
    /// come from.
    pub features: &'static str,
    /// Notes on the facts.
    pub notes: Vec<String>,
    /// One entry per program, in file order.
    pub programs: Vec<ProgramReport>,
}

/// One program on one kernel.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramReport {
    /// Program name.
    pub name: String,
    /// `eligible`, `unsupported` or `pending`.
    pub outcome: &'static str,
    /// The variant the agent would try first, when eligible.
    pub first_choice: Option<String>,
    /// Eligible variants in table order, each with every requirement checked.
    pub eligible: Vec<VariantTrace>,
    /// Rejected variants, each with the requirement that failed.
    pub rejected: Vec<Rejection>,
    /// Config values after fallback.
    pub config: Vec<bpfpoly_crds::state::ResolvedConfig>,
    /// Config fields that cannot be satisfied and have no fallback.
    pub blockers: Vec<String>,
    /// Facts this kernel has no answer for.
    pub pending: Vec<String>,
}

/// An eligible variant.
#[derive(Serialize)]
pub struct VariantTrace {
    /// Variant name.
    pub variant: String,
    /// Every requirement, each holding.
    pub trace: Vec<Check>,
}

/// A rejected variant.
#[derive(Serialize)]
pub struct Rejection {
    /// Variant name.
    pub variant: String,
    /// The first requirement that failed.
    pub failed: Check,
}

fn program_report(p: &BpfPolyProgram, d: &Decision) -> ProgramReport {
    let outcome = match d.outcome() {
        Outcome::Eligible => "eligible",
        Outcome::Unsupported => "unsupported",
        Outcome::Pending => "pending",
    };
    ProgramReport {
        name: p.metadata.name.clone().unwrap_or_default(),
        outcome,
        first_choice: (d.outcome() == Outcome::Eligible)
            .then(|| d.eligible.first().map(|e| e.name.clone()))
            .flatten(),
        eligible: d
            .eligible
            .iter()
            .map(|e| VariantTrace {
                variant: e.name.clone(),
                trace: e.trace.clone(),
            })
            .collect(),
        rejected: d
            .rejected
            .iter()
            .map(|r| Rejection {
                variant: r.name.clone(),
                failed: r.failed.clone(),
            })
            .collect(),
        config: d.config.clone(),
        blockers: d.config_blockers.clone(),
        pending: d.pending.clone(),
    }
}

/// Decides every program on every kernel.
pub fn report(programs: &[BpfPolyProgram], kernels: &[Kernel]) -> Report {
    Report {
        kernels: kernels
            .iter()
            .map(|k| KernelReport {
                source: k.source.clone(),
                release: k.facts.release.clone(),
                features: match k.facts.features {
                    FeatureSource::Probed => "probed",
                    FeatureSource::BtfEnums => "btf-enums",
                    FeatureSource::Unknown => "unknown",
                },
                notes: k.notes.clone(),
                programs: programs
                    .iter()
                    .map(|p| program_report(p, &decide(&p.spec, &k.facts)))
                    .collect(),
            })
            .collect(),
    }
}

/// The human form: per kernel, per program, the in-cluster explain's lines.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for k in &r.kernels {
        let _ = writeln!(
            out,
            "kernel {} ({}; program types, map types and helpers: {})",
            k.release, k.source, k.features
        );
        for n in &k.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        for p in &k.programs {
            let head = match (&p.first_choice, p.outcome) {
                (Some(v), _) => format!("runs variant {v}"),
                (None, "pending") => "pending: some facts have no answer".into(),
                _ => "no variant can run".into(),
            };
            let _ = writeln!(out, "  program {}: {head}", p.name);
            for pe in &p.pending {
                let _ = writeln!(out, "    pending: no answer for {pe}");
            }
            for e in &p.eligible {
                let why: Vec<String> = e
                    .trace
                    .iter()
                    .map(|c| format!("{} {}", c.requirement, c.fact))
                    .collect();
                let why = if why.is_empty() {
                    "no requirements".into()
                } else {
                    why.join("; ")
                };
                let _ = writeln!(out, "    eligible {}: {why}", e.variant);
            }
            for rj in &p.rejected {
                let _ = writeln!(
                    out,
                    "    rejected {}: {} {}",
                    rj.variant, rj.failed.requirement, rj.failed.fact
                );
            }
            for c in &p.config {
                match (&c.reason, c.fell_back) {
                    (Some(why), true) => {
                        let _ =
                            writeln!(out, "    config {} = {} (fallback: {why})", c.name, c.value);
                    }
                    _ => {
                        let _ = writeln!(out, "    config {} = {}", c.name, c.value);
                    }
                }
            }
            for b in &p.blockers {
                let _ = writeln!(out, "    blocked: {b}");
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_enums_are_the_kernel_uapi_names() {
        assert_eq!(
            feature_query("prog", "sched_cls").to_string(),
            "enum:enum bpf_prog_type.BPF_PROG_TYPE_SCHED_CLS"
        );
        assert_eq!(
            feature_query("map", "ringbuf").to_string(),
            "enum:enum bpf_map_type.BPF_MAP_TYPE_RINGBUF"
        );
        assert_eq!(
            feature_query("helper", "bpf_ringbuf_output").to_string(),
            "enum:enum bpf_func_id.BPF_FUNC_ringbuf_output"
        );
    }
}
