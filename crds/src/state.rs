//! `BpfNodeState`: what the operator asks one node to run (spec) and what the agent reports
//! it runs (status).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::program::{ConfigType, Dispatch, FallbackPolicy, Variant};

/// Prefix of the field manager with which a node's agent writes the status of its own
/// `BpfNodeState` and `BpfNodeProfile`; the node name follows (see [`agent_field_manager`]).
pub const AGENT_FIELD_MANAGER_PREFIX: &str = "bpfpoly-agent/";

/// Longest field manager name the API server accepts.
const MAX_FIELD_MANAGER: usize = 128;

/// The field manager of the agent on `node`: `bpfpoly-agent/<node>`. A node name too long for
/// the API server's 128-character limit is shortened to a prefix plus a stable FNV-1a digest
/// of the whole name, so two long names never share a manager by accident.
pub fn agent_field_manager(node: &str) -> String {
    shortened(
        format!("{AGENT_FIELD_MANAGER_PREFIX}{node}"),
        node,
        MAX_FIELD_MANAGER,
        '~',
    )
}

/// `full` when it fits in `max` bytes, else a prefix of it plus a stable FNV-1a digest of
/// `node` after `sep`.
fn shortened(full: String, node: &str, max: usize, sep: char) -> String {
    if full.len() <= max {
        return full;
    }
    let digest = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let suffix = format!("{sep}{digest:016x}");
    let mut keep = max - suffix.len();
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &full[..keep])
}

/// Namespace of the agents' liveness Leases (the one the kubelets' node Leases live in).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Label on every agent liveness Lease (the operator watches only these).
pub const AGENT_LEASE_LABEL: &str = "bpfpoly.io/agent-lease";

/// Annotation of an agent liveness Lease: the kernel boot the agent runs in
/// (`/proc/sys/kernel/random/boot_id`).
pub const BOOT_ID_ANNOTATION: &str = "bpfpoly.io/boot-id";

/// Longest object name the API server accepts (a DNS subdomain).
const MAX_OBJECT_NAME: usize = 253;

/// The liveness Lease of the agent on `node`: `bpfpoly-agent-<node>` in
/// [`NODE_LEASE_NAMESPACE`], renewed by the agent while it runs. (The kubelet's own Lease
/// there is named after the node alone.) Too long a name is shortened like
/// [`agent_field_manager`].
pub fn agent_lease_name(node: &str) -> String {
    shortened(format!("bpfpoly-agent-{node}"), node, MAX_OBJECT_NAME, '-')
}

mod stored;

/// Assignments for one node (name = node name). Stored with the config fallbacks listed
/// once per node (see `stored`).
#[derive(CustomResource, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "bpfpoly.io",
    version = "v1alpha1",
    kind = "BpfNodeState",
    shortname = "bns",
    category = "bpfpoly",
    doc = "Per-node assignments (spec, by the operator) and what the node agent runs (status).",
    status = "BpfNodeStateStatus",
    printcolumn = r#"{"name":"Programs","type":"integer","jsonPath":".status.summary.programs"}"#,
    printcolumn = r#"{"name":"Loaded","type":"integer","jsonPath":".status.summary.loaded"}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.summary.degraded"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct BpfNodeStateSpec {
    /// Programs assigned to this node, written by the operator. Each entry holds only what
    /// differs per node; the agent reads the variant definitions, the dispatch table and the
    /// fallback policy from the BpfPolyProgram itself, at the entry's generation.
    pub programs: Vec<std::sync::Arc<AssignedProgram>>,
}

/// One program assigned to a node, as its node state carries it: which variants this node
/// may run, in order, and which config globals fell back here and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedProgram {
    /// BpfPolyProgram name.
    pub name: String,
    /// BpfPolyProgram generation this assignment was computed from. The agent loads it only
    /// after it has read the program at this generation.
    pub generation: i64,
    /// Names of the variants eligible on this node (`spec.variants[].name`), in the order
    /// the agent tries them. The operator has checked their requirements against this node.
    pub variants: Vec<String>,
    /// The config globals that fall back on this node (they take their `fallback` value),
    /// each with why, sorted by name. Every other global takes its declared `value`. A node
    /// state stores them once per node (`spec.configFallbacks`), not per program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_fallbacks: Vec<ConfigFallback>,
}

/// A config global that falls back on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFallback {
    /// Global name (`spec.config[].name`).
    pub name: String,
    /// Why: the requirement and the node's fact.
    pub reason: String,
}

/// One program as the agent runs it on a node: an [`AssignedProgram`] resolved against its
/// BpfPolyProgram (see [`resolve`]): the candidates in order and the resolved config. Not
/// stored in the API; it is what the loader takes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgramAssignment {
    /// BpfPolyProgram name.
    pub name: String,
    /// BpfPolyProgram generation this assignment was computed from.
    pub generation: i64,
    /// Eligible variants in the order the agent tries them, without their `requires` (the
    /// operator has checked those for this node).
    pub candidates: Vec<Variant>,
    /// Config values to write into `.rodata`, after node-level fallback.
    #[serde(default)]
    pub config: Vec<ResolvedConfig>,
    /// The dispatch table, if the program has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
    /// Degradation policy.
    #[serde(default)]
    pub fallback: FallbackPolicy,
}

/// A config global resolved for one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedConfig {
    /// Global name.
    pub name: String,
    /// Declared type.
    #[serde(rename = "type")]
    pub type_: ConfigType,
    /// The value to write.
    pub value: String,
    /// True when the fallback value was chosen.
    #[serde(default)]
    pub fell_back: bool,
    /// Why the fallback was chosen (the requirement and the node's fact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why an [`AssignedProgram`] cannot be resolved against the program the agent has read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The program read is at another generation (the agent waits for the one assigned).
    #[error("the assignment is for generation {assigned} of BpfPolyProgram {name:?}, and this agent has read generation {read}")]
    Generation {
        /// Program name.
        name: String,
        /// Generation in the node state.
        assigned: i64,
        /// Generation of the program read.
        read: i64,
    },
    /// A name in the assignment is not in the program at that generation.
    #[error(
        "BpfPolyProgram {name:?} generation {generation}: {what} {missing:?} is not in its spec"
    )]
    Unknown {
        /// Program name.
        name: String,
        /// Its generation.
        generation: i64,
        /// `variant` or `config global`.
        what: &'static str,
        /// The name not found.
        missing: String,
    },
    /// A global said to fall back has no fallback value.
    #[error("BpfPolyProgram {name:?} generation {generation}: config global {global:?} falls back on this node but has no fallback value")]
    NoFallback {
        /// Program name.
        name: String,
        /// Its generation.
        generation: i64,
        /// The global.
        global: String,
    },
}

/// `a` resolved against `program` (read at `generation`, its `metadata.generation`): the
/// named variants in the assignment's order without their `requires`, every config global
/// with its value (the fallback where the assignment says so, with its reason), the
/// program's dispatch table and fallback policy.
pub fn resolve(
    a: &AssignedProgram,
    program: &crate::BpfPolyProgramSpec,
    generation: i64,
) -> Result<ProgramAssignment, ResolveError> {
    if generation != a.generation {
        return Err(ResolveError::Generation {
            name: a.name.clone(),
            assigned: a.generation,
            read: generation,
        });
    }
    let unknown = |what, missing: &str| ResolveError::Unknown {
        name: a.name.clone(),
        generation,
        what,
        missing: missing.to_string(),
    };
    let candidates = a
        .variants
        .iter()
        .map(|n| {
            program
                .variants
                .iter()
                .find(|v| &v.name == n)
                .map(|v| Variant {
                    requires: Default::default(),
                    ..v.clone()
                })
                .ok_or_else(|| unknown("variant", n))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(f) = a
        .config_fallbacks
        .iter()
        .find(|f| !program.config.iter().any(|c| c.name == f.name))
    {
        return Err(unknown("config global", &f.name));
    }
    let config = program
        .config
        .iter()
        .map(|c| {
            let fell = a.config_fallbacks.iter().find(|f| f.name == c.name);
            let value = match fell {
                None => c.value.clone(),
                Some(_) => c.fallback.clone().ok_or_else(|| ResolveError::NoFallback {
                    name: a.name.clone(),
                    generation,
                    global: c.name.clone(),
                })?,
            };
            Ok(ResolvedConfig {
                name: c.name.clone(),
                type_: c.type_,
                value,
                fell_back: fell.is_some(),
                reason: fell.map(|f| f.reason.clone()),
            })
        })
        .collect::<Result<Vec<_>, ResolveError>>()?;
    Ok(ProgramAssignment {
        name: a.name.clone(),
        generation,
        candidates,
        config,
        dispatch: program.dispatch.clone(),
        fallback: program.fallback.clone(),
    })
}

/// What the agent runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BpfNodeStateStatus {
    /// One entry per assigned (or still unloading) program.
    #[serde(default)]
    pub programs: Vec<ProgramStatus>,
    /// Counts for the printer columns.
    #[serde(default)]
    pub summary: StateSummary,
    /// The kernel boot this report comes from (`/proc/sys/kernel/random/boot_id`). After a
    /// reboot the programs of an older boot are gone, so the operator believes a report only
    /// from the boot its agent's liveness Lease names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// Counts of programs by phase on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct StateSummary {
    /// Programs reported.
    pub programs: u32,
    /// Loaded as intended.
    pub loaded: u32,
    /// Loaded after a fallback.
    pub degraded: u32,
    /// Failed to load.
    pub failed: u32,
}

/// Lifecycle phase of a program on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Not yet handled.
    #[default]
    Pending,
    /// Being loaded.
    Loading,
    /// Running as intended (first candidate, every handler, no config fallback).
    Loaded,
    /// Running after a fallback.
    Degraded,
    /// Could not be loaded.
    Failed,
    /// Removed from the node.
    Unloaded,
}

/// Per-program status on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    /// BpfPolyProgram name.
    pub name: String,
    /// Assignment generation this status reflects.
    #[serde(default)]
    pub observed_generation: i64,
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: Phase,
    /// Variant running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Dispatch mechanism in use: static, tailCall or freplace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    /// State of each dispatch slot.
    #[serde(default)]
    pub handlers: Vec<HandlerState>,
    /// Degradations on the way to the running variant.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub fallbacks: Vec<FallbackRecord>,
    /// Kernel program ids of the running programs.
    #[serde(default)]
    pub program_ids: Vec<u32>,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the phase last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// A dispatch slot on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct HandlerState {
    /// Dispatch key.
    pub key: u32,
    /// Handler program.
    pub handler: String,
    /// `Loaded`, or `Empty` when its keys take the default path.
    pub state: String,
    /// Why the slot is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Stage at which a candidate failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FallbackStage {
    /// The verifier rejected the program.
    Verify,
    /// The program loaded but could not attach.
    Attach,
    /// A dispatch handler was rejected.
    Handler,
}

impl std::fmt::Display for FallbackStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FallbackStage::Verify => "verify",
            FallbackStage::Attach => "attach",
            FallbackStage::Handler => "handler",
        })
    }
}

/// One degradation step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackRecord {
    /// Variant (or handler) that failed.
    pub from: String,
    /// What was tried next (variant name, `default-path`, or `none`).
    pub to: String,
    /// Where it failed.
    pub stage: FallbackStage,
    /// The error.
    pub reason: String,
    /// Tail of the verifier log (bounded, at most 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub verifier_log: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program() -> crate::BpfPolyProgramSpec {
        serde_yaml::from_str(
            r#"
variants:
- {name: a, bytecode: {builtin: x}, programs: [{name: f}], requires: {kernel: ">=6.6"}}
- {name: b, bytecode: {builtin: y}, programs: [{name: f}]}
config:
- {name: count, type: bool, value: "true", fallback: "false", requires: {kernel: ">=6.6"}}
- {name: limit, type: u32, value: "7"}
"#,
        )
        .unwrap()
    }

    fn assigned(generation: i64, variants: &[&str], fell: &[&str]) -> AssignedProgram {
        AssignedProgram {
            name: "p".into(),
            generation,
            variants: variants.iter().map(ToString::to_string).collect(),
            config_fallbacks: fell
                .iter()
                .map(|n| ConfigFallback {
                    name: n.to_string(),
                    reason: "kernel >=6.6 kernel is 6.1.0".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn resolve_takes_the_named_variants_in_order_and_the_fallback_values() {
        let r = resolve(&assigned(3, &["b", "a"], &["count"]), &program(), 3).unwrap();
        let names: Vec<&str> = r.candidates.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert!(r
            .candidates
            .iter()
            .all(|v| v.requires == Default::default()));
        assert_eq!(r.generation, 3);
        let config: Vec<(&str, &str, bool, Option<&str>)> = r
            .config
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.value.as_str(),
                    c.fell_back,
                    c.reason.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            config,
            [
                ("count", "false", true, Some("kernel >=6.6 kernel is 6.1.0")),
                ("limit", "7", false, None)
            ]
        );
        let plain = resolve(&assigned(3, &["a"], &[]), &program(), 3).unwrap();
        assert_eq!(plain.config[0].value, "true");
        assert!(!plain.config[0].fell_back);
    }

    #[test]
    fn resolve_refuses_another_generation_and_names_it_does_not_know() {
        let e = resolve(&assigned(3, &["a"], &[]), &program(), 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the assignment is for generation 3 of BpfPolyProgram \"p\", and this agent has read generation 4"
        );
        let e = resolve(&assigned(3, &["a", "z"], &[]), &program(), 3).unwrap_err();
        assert!(
            e.to_string().contains("variant \"z\" is not in its spec"),
            "{e}"
        );
        let e = resolve(&assigned(3, &["a"], &["nope"]), &program(), 3).unwrap_err();
        assert!(e.to_string().contains("config global \"nope\""), "{e}");
        let e = resolve(&assigned(3, &["a"], &["limit"]), &program(), 3).unwrap_err();
        assert!(e.to_string().contains("has no fallback value"), "{e}");
    }

    #[test]
    fn an_assigned_program_is_small_and_omits_empty_fallbacks() {
        let json =
            serde_json::to_string(&assigned(1, &["kprobe", "tp-btf", "tracepoint"], &[])).unwrap();
        assert_eq!(
            json,
            r#"{"name":"p","generation":1,"variants":["kprobe","tp-btf","tracepoint"]}"#
        );
    }

    #[test]
    fn agent_field_manager_names_the_node_and_fits_the_limit() {
        assert_eq!(agent_field_manager("worker-1"), "bpfpoly-agent/worker-1");
        let long_a = format!("{}a", "n".repeat(252));
        let long_b = format!("{}b", "n".repeat(252));
        let (a, b) = (agent_field_manager(&long_a), agent_field_manager(&long_b));
        assert_eq!(a.len(), 128);
        assert_eq!(b.len(), 128);
        assert_ne!(a, b);
        assert!(a.starts_with(AGENT_FIELD_MANAGER_PREFIX));
        assert_eq!(a, agent_field_manager(&long_a));
    }

    #[test]
    fn agent_lease_name_is_prefixed_and_fits_an_object_name() {
        assert_eq!(agent_lease_name("debian-6-1"), "bpfpoly-agent-debian-6-1");
        let long = "n".repeat(253);
        let name = agent_lease_name(&long);
        assert_eq!(name.len(), 253);
        assert!(name.starts_with("bpfpoly-agent-nnn"));
        assert_ne!(name, agent_lease_name(&format!("{}m", "n".repeat(252))));
    }
}
