//! `BpfPolyProgram`: one logical eBPF program with its variant table, dispatch table,
//! typed config globals, fallback policy and rollout strategy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::int_or_percent_schema;

mod status;
pub use status::{BpfPolyProgramStatus, NodeCounts, NodeSample, RolloutStatus, VariantCount};

/// A polymorphic eBPF program: ordered kernel-specific variants, an in-kernel dispatch
/// table, typed `.rodata` config with fallback values, and how to degrade and roll out.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "bpfpoly.io",
    version = "v1alpha1",
    kind = "BpfPolyProgram",
    shortname = "bpp",
    category = "bpfpoly",
    doc = "A polymorphic eBPF program (bpfpoly.io): variants, dispatch table, typed config with fallbacks, fallback policy and rollout.",
    status = "BpfPolyProgramStatus",
    printcolumn = r#"{"name":"Variants","type":"string","description":"Variant chosen per node count","jsonPath":".status.variantSummary"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.nodes.selected"}"#,
    printcolumn = r#"{"name":"Loaded","type":"integer","jsonPath":".status.nodes.loaded"}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.nodes.degraded"}"#,
    printcolumn = r#"{"name":"Unsupported","type":"integer","jsonPath":".status.nodes.unsupported"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BpfPolyProgramSpec {
    /// Nodes this program runs on (a metav1.LabelSelector over Node labels). Empty or absent
    /// selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Implementations in order of preference. On each node the operator keeps those whose
    /// `requires` hold; the agent loads the first one the verifier accepts and attaches.
    #[schemars(length(min = 1, max = 32))]
    pub variants: Vec<Variant>,
    /// Typed `volatile const` globals written into the object's `.rodata` before load. A field
    /// whose `requires` fails on a node gets its `fallback` value instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub config: Vec<ConfigField>,
    /// In-kernel dispatch from type tags (keys) to handler programs. Applies to every variant
    /// that lists the `entry` program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
    /// What to do when a variant, a handler or every variant cannot be used on a node.
    #[serde(default)]
    pub fallback: FallbackPolicy,
    /// How changes roll out across the selected nodes.
    #[serde(default)]
    pub rollout: Rollout,
}

/// One implementation of the program, with the kernel facts it needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    /// Unique name of the variant within the program, e.g. `tp-btf`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Where the eBPF object of this variant comes from: exactly one of builtin, configMap or path.
    pub bytecode: Bytecode,
    /// The programs of the object this variant uses, by C function name, with their attach
    /// points. Dispatch handlers are listed here without `attach`.
    #[schemars(length(min = 1, max = 64))]
    pub programs: Vec<ProgramRef>,
    /// Kernel requirements; all must hold on a node for the variant to be eligible there.
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub requires: Requirements,
    /// Dispatch mechanism this variant is built for, overriding `spec.dispatch.mechanism`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_mechanism: Option<DispatchMechanism>,
    /// Object holding the freplace handlers (`SEC("freplace/bpfpoly_slot_<key>")`) that
    /// replace the entry's slot functions, for the freplace mechanism. Same rules as `bytecode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler_bytecode: Option<Bytecode>,
}

/// The source of an eBPF object. Exactly one of `builtin`, `configMap` or `path`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bytecode {
    /// Name of an object shipped inside the agent (see `bpfpoly-agent builtins`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub builtin: Option<String>,
    /// An object stored in a ConfigMap's binaryData. Requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapBytecode>,
    /// Absolute path of an object file on the node, under the agent's allowed bytecode
    /// directories. Requires `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// Lowercase hex SHA-256 of the object. Required for configMap and path; checked for
    /// builtin when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// A key in a ConfigMap's binaryData holding an eBPF object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapBytecode {
    /// Namespace of the ConfigMap; the agent reads only namespaces it is allowed to.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in binaryData.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A program of the object, by C function name, and where it attaches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgramRef {
    /// C function name of the program in the object.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Attach point; exactly one kind. Omitted for dispatch handlers, which are reached
    /// through the dispatch table rather than attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attach>,
}

/// Where a program attaches. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attach {
    /// BTF-enabled tracepoint (`tp_btf/<name>`), program type tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_btf: Option<NamedTarget>,
    /// Classic tracepoint `<category>/<name>`, program type tracepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracepoint: Option<TracepointTarget>,
    /// Raw tracepoint by name, program type raw_tracepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_tracepoint: Option<NamedTarget>,
    /// Kernel function probe, program type kprobe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kprobe: Option<KprobeTarget>,
    /// Function entry trampoline, program type tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fentry: Option<FunctionTarget>,
    /// Function exit trampoline, program type tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fexit: Option<FunctionTarget>,
    /// XDP on network interfaces, program type xdp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<XdpTarget>,
    /// TC classifier on network interfaces, program type sched_cls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc: Option<TcTarget>,
}

/// A target named by a single identifier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct NamedTarget {
    /// Name of the tracepoint.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
}

/// A classic tracepoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TracepointTarget {
    /// Tracepoint category (subsystem), e.g. `sched`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub category: String,
    /// Tracepoint name, e.g. `sched_process_exec`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
}

/// A kprobe on a kernel function.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct KprobeTarget {
    /// Kernel function to probe.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.]*$")
    )]
    pub function: String,
    /// Byte offset into the function.
    #[serde(default)]
    #[schemars(range(min = 0, max = 65536))]
    pub offset: u64,
}

/// A kernel function for fentry/fexit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct FunctionTarget {
    /// Kernel function (a BTF FUNC).
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub function: String,
}

/// XDP attachment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct XdpTarget {
    /// Interfaces to attach to; interfaces missing on a node are reported, not fatal.
    #[schemars(length(min = 1, max = 64))]
    pub interfaces: Vec<String>,
    /// `skb` (generic) or `driver` (native) mode.
    #[serde(default)]
    pub mode: XdpMode,
}

/// XDP attach mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum XdpMode {
    /// Generic XDP, works on every interface.
    #[default]
    Skb,
    /// Native driver XDP.
    Driver,
}

/// TC classifier attachment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TcTarget {
    /// Interfaces to attach to.
    #[schemars(length(min = 1, max = 64))]
    pub interfaces: Vec<String>,
    /// `ingress` or `egress`.
    #[serde(default)]
    pub direction: TcDirection,
}

/// TC direction.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TcDirection {
    /// Ingress hook.
    #[default]
    Ingress,
    /// Egress hook.
    Egress,
}

/// Kernel requirements. Every listed fact must hold on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requirements {
    /// Kernel version comparators, comma separated, e.g. `>=5.8` or `>=5.4, <6.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub kernel: Option<String>,
    /// Whether kernel BTF (`/sys/kernel/btf/vmlinux`) must be available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btf: Option<bool>,
    /// BTF types that must exist, e.g. `struct task_struct`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub types: Vec<String>,
    /// BTF struct/union fields that must exist, e.g. `struct task_struct.loginuid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub fields: Vec<String>,
    /// BTF enum values that must exist, e.g. `enum bpf_func_id.BPF_FUNC_ringbuf_output`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub enum_values: Vec<String>,
    /// BTF functions that must exist (kfuncs, fentry targets), e.g. `do_sys_openat2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub functions: Vec<String>,
    /// Program types that must be supported, by bpftool name (e.g. `xdp`, `tracing`, `ext`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub program_types: Vec<String>,
    /// Map types that must be supported, by bpftool name (e.g. `ringbuf`, `prog_array`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub map_types: Vec<String>,
    /// Helpers that must be available for every program type the variant uses, e.g.
    /// `bpf_ringbuf_output`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub helpers: Vec<String>,
}

impl Requirements {
    /// True when nothing is required.
    pub fn is_empty(&self) -> bool {
        self == &Requirements::default()
    }
}

/// A typed `volatile const` global of the object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigField {
    /// Name of the global in the object's `.rodata`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Scalar type; checked against the object's BTF before load.
    #[serde(rename = "type")]
    pub type_: ConfigType,
    /// Value written when `requires` holds (or there is no `requires`).
    #[schemars(length(min = 1, max = 32))]
    pub value: String,
    /// Value written when `requires` does not hold. Without a fallback, a node where the
    /// requirement fails is not eligible for the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub fallback: Option<String>,
    /// Kernel requirements for `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<Requirements>,
}

/// Scalar types allowed for config globals.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConfigType {
    /// `bool`, one byte; values `true` / `false`.
    Bool,
    /// `__u8`.
    U8,
    /// `__u16`.
    U16,
    /// `__u32`.
    U32,
    /// `__u64`.
    U64,
    /// `__s32`.
    I32,
    /// `__s64`.
    I64,
}

/// The dispatch table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dispatch {
    /// The entry program (C function name) that parses the event and dispatches by key.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub entry: String,
    /// `auto` picks freplace where the kernel loads it, else tail calls.
    #[serde(default)]
    pub mechanism: DispatchMechanism,
    /// The PROG_ARRAY map used for tail calls.
    #[serde(default = "default_jump_table")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub table: String,
    /// Key to handler program. Keys without a loaded handler take the default path.
    #[schemars(length(max = 256))]
    pub slots: Vec<DispatchSlot>,
}

fn default_jump_table() -> String {
    "jump_table".to_string()
}

/// How the entry program reaches its handlers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DispatchMechanism {
    /// freplace where it loads, else tail calls.
    #[default]
    Auto,
    /// Direct calls gated by a `.rodata` enable mask.
    Static,
    /// Tail calls through a PROG_ARRAY.
    TailCall,
    /// freplace (BPF_PROG_TYPE_EXT) of global-function slots.
    Freplace,
}

/// One entry of the dispatch table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct DispatchSlot {
    /// Type tag, e.g. an IP protocol number.
    #[schemars(range(min = 0, max = 255))]
    pub key: u32,
    /// Handler program (C function name); must be a program of every dispatching variant.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub handler: String,
}

/// Degradation policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackPolicy {
    /// On a verifier rejection or attach failure: try the next eligible variant, or fail.
    #[serde(default)]
    pub on_verifier_reject: OnVerifierReject,
    /// When no variant is eligible on a node: skip the node (Unsupported) or mark it Failed.
    #[serde(default)]
    pub on_no_eligible_variant: OnNoEligibleVariant,
    /// When a handler is rejected: leave its slot empty (default path) or reject the variant.
    #[serde(default)]
    pub on_handler_reject: OnHandlerReject,
    /// Keep the running version when an update fails (make-before-break).
    #[serde(default = "default_true")]
    pub keep_previous_on_failure: bool,
}

fn default_true() -> bool {
    true
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        FallbackPolicy {
            on_verifier_reject: OnVerifierReject::default(),
            on_no_eligible_variant: OnNoEligibleVariant::default(),
            on_handler_reject: OnHandlerReject::default(),
            keep_previous_on_failure: true,
        }
    }
}

/// Policy on a verifier rejection or attach failure.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OnVerifierReject {
    /// Try the next eligible variant.
    #[default]
    NextVariant,
    /// Stop and report Failed.
    Fail,
}

/// Policy when no variant is eligible on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OnNoEligibleVariant {
    /// Leave the node out and count it Unsupported.
    #[default]
    Skip,
    /// Count the node Failed.
    Fail,
}

/// Policy when a handler is rejected.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OnHandlerReject {
    /// Leave the slot empty; its keys take the default path.
    #[default]
    DefaultPath,
    /// Treat the whole variant as rejected and move on.
    RejectVariant,
}

/// Rollout strategy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Nodes changing at once after the canaries: an integer or a percentage of selected nodes.
    #[serde(default = "default_max_unavailable")]
    #[schemars(schema_with = "int_or_percent_schema")]
    pub max_unavailable: IntOrString,
    /// Nodes that must reach Loaded (or Degraded) before the rest proceed.
    #[serde(default = "default_canary")]
    #[schemars(range(min = 0, max = 1000))]
    pub canary: u32,
    /// Pause when more than this share of updated nodes is Degraded or Failed.
    #[serde(default = "default_pause_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub pause_on_degraded_ratio: f64,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::String("25%".to_string())
}
fn default_canary() -> u32 {
    1
}
fn default_pause_ratio() -> f64 {
    0.5
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_unavailable: default_max_unavailable(),
            canary: default_canary(),
            pause_on_degraded_ratio: default_pause_ratio(),
        }
    }
}
