//! The variant-selection engine: pure, no I/O. Given a program spec and a node's profile,
//! it decides which variants are eligible there (in table order, each with the trace of
//! its requirements), which are rejected and why, and which config fields fall back.

use std::collections::{BTreeMap, BTreeSet};

use crate::profile::BpfNodeProfileStatus;
use crate::program::{Attach, BpfPolyProgramSpec, DispatchMechanism, Requirements, Variant};
use crate::requirement::{
    parse_enum_value, parse_field, parse_function, parse_helper, parse_type, KernelRequirement,
    KernelVersion, Query,
};
use crate::state::ResolvedConfig;

/// The facts of one node that requirements are checked against.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    /// Parsed kernel version, when the release string could be parsed.
    pub kernel: Option<KernelVersion>,
    /// Kernel release string as reported.
    pub release: String,
    /// Whether the node has BTF.
    pub btf: bool,
    /// Program types probed as supported.
    pub program_types: BTreeSet<String>,
    /// Program types seen loading for real.
    pub observed_program_types: BTreeSet<String>,
    /// Map types probed as supported.
    pub map_types: BTreeSet<String>,
    /// Answers to BTF and helper queries.
    pub answers: BTreeMap<String, bool>,
    /// False until the agent has published a profile at all.
    pub reported: bool,
    /// Where `program_types`, `map_types` and the helper answers come from.
    pub features: FeatureSource,
}

/// Where a node's program-type, map-type and helper facts come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FeatureSource {
    /// Probed on the running kernel by its agent (what the cluster uses).
    #[default]
    Probed,
    /// Read from the kernel's BTF (`enum bpf_prog_type`, `enum bpf_map_type`,
    /// `enum bpf_func_id`): what that kernel was built to know, not probed. Offline
    /// explain uses it for another kernel's BTF.
    BtfEnums,
    /// Not known: requirements on them stay pending.
    Unknown,
}

impl NodeFacts {
    /// Facts from a published profile status.
    pub fn from_status(s: &BpfNodeProfileStatus) -> NodeFacts {
        NodeFacts {
            kernel: KernelVersion::from_release(&s.kernel.release).ok(),
            release: s.kernel.release.clone(),
            btf: s.btf.available,
            program_types: s.program_types.iter().cloned().collect(),
            observed_program_types: s.observed_program_types.iter().cloned().collect(),
            map_types: s.map_types.iter().cloned().collect(),
            answers: s.answers.clone(),
            reported: !s.kernel.release.is_empty(),
            features: FeatureSource::Probed,
        }
    }
}

/// One requirement checked against a node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// The requirement, e.g. `field struct task_struct.loginuid`.
    pub requirement: String,
    /// Whether it holds.
    pub holds: bool,
    /// The node's fact, e.g. `missing on this kernel`.
    pub fact: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.requirement, self.fact)
    }
}

/// A variant usable on the node, with why.
#[derive(Clone, Debug, PartialEq)]
pub struct EligibleVariant {
    /// Variant name.
    pub name: String,
    /// Every requirement, each holding.
    pub trace: Vec<Check>,
}

/// A variant not usable on the node.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedVariant {
    /// Variant name.
    pub name: String,
    /// The first requirement that failed.
    pub failed: Check,
}

/// Everything decided for one program on one node.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Decision {
    /// Eligible variants, in table order.
    pub eligible: Vec<EligibleVariant>,
    /// Rejected variants, in table order.
    pub rejected: Vec<RejectedVariant>,
    /// Config values after node-level fallback.
    pub config: Vec<ResolvedConfig>,
    /// Config fields whose requirement fails and that have no fallback.
    pub config_blockers: Vec<String>,
    /// Facts the node has not answered yet; non-empty means the decision is pending.
    pub pending: Vec<String>,
}

/// The overall outcome of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node has not answered every fact yet.
    Pending,
    /// At least one variant can be tried.
    Eligible,
    /// No variant can run (or a config field without fallback cannot be satisfied).
    Unsupported,
}

impl Decision {
    /// The overall outcome.
    pub fn outcome(&self) -> Outcome {
        if !self.pending.is_empty() {
            Outcome::Pending
        } else if self.eligible.is_empty() || !self.config_blockers.is_empty() {
            Outcome::Unsupported
        } else {
            Outcome::Eligible
        }
    }

    /// One line per rejected variant and blocker: why the node cannot use them.
    pub fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .rejected
            .iter()
            .map(|r| format!("variant {}: {}", r.name, r.failed))
            .collect();
        out.extend(self.config_blockers.iter().cloned());
        out
    }

    /// Multi-line human-readable explanation, for `explain`.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        if !self.pending.is_empty() {
            s.push_str(&format!(
                "pending: waiting for {}\n",
                self.pending.join(", ")
            ));
        }
        for e in &self.eligible {
            let why: Vec<String> = e.trace.iter().map(|c| c.to_string()).collect();
            let why = if why.is_empty() {
                "no requirements".to_string()
            } else {
                why.join("; ")
            };
            s.push_str(&format!("eligible {}: {}\n", e.name, why));
        }
        for r in &self.rejected {
            s.push_str(&format!("rejected {}: {}\n", r.name, r.failed));
        }
        for c in &self.config {
            match (&c.reason, c.fell_back) {
                (Some(r), true) => s.push_str(&format!(
                    "config {} = {} (fallback: {})\n",
                    c.name, c.value, r
                )),
                _ => s.push_str(&format!("config {} = {}\n", c.name, c.value)),
            }
        }
        for b in &self.config_blockers {
            s.push_str(&format!("blocked: {b}\n"));
        }
        s
    }
}

/// The program type of an attach point (bpftool names).
pub fn attach_program_type(a: &Attach) -> &'static str {
    if a.tp_btf.is_some() || a.fentry.is_some() || a.fexit.is_some() {
        "tracing"
    } else if a.tracepoint.is_some() {
        "tracepoint"
    } else if a.raw_tracepoint.is_some() {
        "raw_tracepoint"
    } else if a.kprobe.is_some() {
        "kprobe"
    } else if a.xdp.is_some() {
        "xdp"
    } else {
        "sched_cls"
    }
}

/// Program types a variant's attached programs use; helper requirements are checked for each.
pub fn variant_program_types(v: &Variant) -> BTreeSet<&'static str> {
    let mut set: BTreeSet<&'static str> = v
        .programs
        .iter()
        .filter_map(|p| p.attach.as_ref().map(attach_program_type))
        .collect();
    if v.dispatch_mechanism == Some(DispatchMechanism::Freplace) {
        set.insert("ext");
    }
    set
}

fn all_program_types(spec: &BpfPolyProgramSpec) -> BTreeSet<&'static str> {
    spec.variants
        .iter()
        .flat_map(variant_program_types)
        .collect()
}

/// The queries a requirement set needs answered, for the given program types.
fn requirement_queries(r: &Requirements, prog_types: &BTreeSet<&'static str>) -> Vec<Query> {
    let mut q = Vec::new();
    q.extend(
        r.types
            .iter()
            .filter_map(|t| parse_type(t).ok())
            .map(Query::Type),
    );
    q.extend(
        r.fields
            .iter()
            .filter_map(|t| parse_field(t).ok())
            .map(Query::Field),
    );
    q.extend(
        r.enum_values
            .iter()
            .filter_map(|t| parse_enum_value(t).ok())
            .map(Query::Enum),
    );
    q.extend(
        r.functions
            .iter()
            .filter_map(|t| parse_function(t).ok())
            .map(Query::Func),
    );
    for h in r.helpers.iter().filter_map(|h| parse_helper(h).ok()) {
        for pt in prog_types {
            q.push(Query::Helper {
                program_type: pt.to_string(),
                helper: h.to_string(),
            });
        }
    }
    q
}

/// Every query a program needs answered on a node, sorted and deduplicated.
pub fn program_queries(spec: &BpfPolyProgramSpec) -> BTreeSet<Query> {
    let mut out = BTreeSet::new();
    for v in &spec.variants {
        out.extend(requirement_queries(&v.requires, &variant_program_types(v)));
    }
    let all = all_program_types(spec);
    for c in &spec.config {
        if let Some(r) = &c.requires {
            out.extend(requirement_queries(r, &all));
        }
    }
    out
}

/// Result of checking one requirement set.
enum Eval {
    Holds(Vec<Check>),
    Fails(Check),
    Pending(Vec<String>),
}

fn answer(facts: &NodeFacts, q: &Query, what: String, pending: &mut Vec<String>) -> Option<Check> {
    let key = q.to_string();
    match facts.answers.get(&key) {
        Some(&holds) => Some(Check {
            requirement: what,
            holds,
            fact: if holds {
                "present".into()
            } else {
                "missing on this kernel".into()
            },
        }),
        None => {
            pending.push(key);
            None
        }
    }
}

fn evaluate(r: &Requirements, prog_types: &BTreeSet<&'static str>, facts: &NodeFacts) -> Eval {
    if !facts.reported {
        return Eval::Pending(vec!["node profile".into()]);
    }
    let mut checks = Vec::new();
    let mut pending = Vec::new();
    checks.extend(check_kernel(r, facts));
    checks.extend(check_btf(r, facts));
    for q in &requirement_queries(r, prog_types) {
        if let Some(c) = answer(facts, q, query_label(q), &mut pending) {
            checks.push(c);
        }
    }
    for pt in &r.program_types {
        checks.extend(check_program_type(pt, facts, &mut pending));
    }
    for mt in &r.map_types {
        checks.extend(check_map_type(mt, facts, &mut pending));
    }
    if let Some(failed) = checks.iter().find(|c| !c.holds) {
        // A definite failure decides, even while other facts are still unanswered.
        return Eval::Fails(failed.clone());
    }
    if !pending.is_empty() {
        return Eval::Pending(pending);
    }
    Eval::Holds(checks)
}

/// `requires.kernel` against the node's release. Syntax errors are caught by validation;
/// an unparsable requirement is treated as failing.
fn check_kernel(r: &Requirements, facts: &NodeFacts) -> Option<Check> {
    let k = r.kernel.as_ref()?;
    let req = KernelRequirement::parse(k);
    let (holds, fact) = match (&req, facts.kernel) {
        (Ok(req), Some(v)) => (req.matches(v), format!("kernel is {v} ({})", facts.release)),
        (Err(e), _) => (false, format!("invalid requirement: {e}")),
        (_, None) => (
            false,
            format!("kernel release {:?} is not parsable", facts.release),
        ),
    };
    Some(Check {
        requirement: format!("kernel {k}"),
        holds,
        fact,
    })
}

/// `requires.btf: true` against whether the node has kernel BTF.
fn check_btf(r: &Requirements, facts: &NodeFacts) -> Option<Check> {
    (r.btf == Some(true)).then(|| Check {
        requirement: "btf".into(),
        holds: facts.btf,
        fact: if facts.btf {
            "available".into()
        } else {
            "not available on this kernel".into()
        },
    })
}

/// How a BTF query reads in a trace line.
fn query_label(q: &Query) -> String {
    match q {
        Query::Type(t) => format!("type {t}"),
        Query::Field(t) => format!("field {t}"),
        Query::Enum(t) => format!("enum value {t}"),
        Query::Func(t) => format!("function {t}"),
        Query::Helper {
            program_type,
            helper,
        } => format!("helper {helper} for {program_type}"),
    }
}

/// One required program type: observed loading, probed, or read from BTF enums. Unknown
/// sources leave it pending, never false.
fn check_program_type(pt: &str, facts: &NodeFacts, pending: &mut Vec<String>) -> Option<Check> {
    let observed = facts.observed_program_types.contains(pt);
    let known = facts.program_types.contains(pt);
    let fact = match (observed, known, facts.features) {
        (true, _, _) => "observed loading on this node",
        (false, _, FeatureSource::Unknown) => {
            pending.push(format!("program type {pt} (not probed on this kernel)"));
            return None;
        }
        (false, true, FeatureSource::Probed) => "supported (probed)",
        (false, false, FeatureSource::Probed) => "not supported on this kernel (probed)",
        (false, true, FeatureSource::BtfEnums) => {
            "in this kernel's enum bpf_prog_type (BTF, not probed)"
        }
        (false, false, FeatureSource::BtfEnums) => "not in this kernel's enum bpf_prog_type (BTF)",
    };
    Some(Check {
        requirement: format!("program type {pt}"),
        holds: observed || known,
        fact: fact.into(),
    })
}

/// One required map type, probed or read from BTF enums; pending when unknown.
fn check_map_type(mt: &str, facts: &NodeFacts, pending: &mut Vec<String>) -> Option<Check> {
    let holds = facts.map_types.contains(mt);
    let fact = match (holds, facts.features) {
        (_, FeatureSource::Unknown) => {
            pending.push(format!("map type {mt} (not probed on this kernel)"));
            return None;
        }
        (true, FeatureSource::Probed) => "supported (probed)",
        (false, FeatureSource::Probed) => "not supported on this kernel (probed)",
        (true, FeatureSource::BtfEnums) => "in this kernel's enum bpf_map_type (BTF, not probed)",
        (false, FeatureSource::BtfEnums) => "not in this kernel's enum bpf_map_type (BTF)",
    };
    Some(Check {
        requirement: format!("map type {mt}"),
        holds,
        fact: fact.into(),
    })
}

/// Decides one program on one node.
pub fn decide(spec: &BpfPolyProgramSpec, facts: &NodeFacts) -> Decision {
    let mut d = Decision::default();
    for v in &spec.variants {
        match evaluate(&v.requires, &variant_program_types(v), facts) {
            Eval::Holds(trace) => d.eligible.push(EligibleVariant {
                name: v.name.clone(),
                trace,
            }),
            Eval::Fails(failed) => d.rejected.push(RejectedVariant {
                name: v.name.clone(),
                failed,
            }),
            Eval::Pending(p) => d.pending.extend(p),
        }
    }
    let all = all_program_types(spec);
    for c in &spec.config {
        let eval = match &c.requires {
            Some(r) => evaluate(r, &all, facts),
            None => Eval::Holds(Vec::new()),
        };
        match eval {
            Eval::Holds(_) => d.config.push(ResolvedConfig {
                name: c.name.clone(),
                type_: c.type_,
                value: c.value.clone(),
                fell_back: false,
                reason: None,
            }),
            Eval::Fails(failed) => match &c.fallback {
                Some(fb) => d.config.push(ResolvedConfig {
                    name: c.name.clone(),
                    type_: c.type_,
                    value: fb.clone(),
                    fell_back: true,
                    reason: Some(failed.to_string()),
                }),
                None => d.config_blockers.push(format!(
                    "config {}: {} and it has no fallback",
                    c.name, failed
                )),
            },
            Eval::Pending(p) => d.pending.extend(p),
        }
    }
    d.pending.sort();
    d.pending.dedup();
    d
}
