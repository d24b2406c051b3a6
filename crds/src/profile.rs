//! `BpfNodeProfile`: what a node's kernel offers. The operator writes the BTF queries the
//! programs selecting the node need; the agent answers them and publishes the probed facts.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kernel profile of one node (name = node name).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "bpfpoly.io",
    version = "v1alpha1",
    kind = "BpfNodeProfile",
    shortname = "bnp",
    category = "bpfpoly",
    doc = "The kernel profile of one node: BTF facts and probed features, written by the node agent.",
    status = "BpfNodeProfileStatus",
    printcolumn = r#"{"name":"Kernel","type":"string","jsonPath":".status.kernel.release"}"#,
    printcolumn = r#"{"name":"BTF","type":"boolean","jsonPath":".status.btf.available"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BpfNodeProfileSpec {
    /// Facts the programs selecting this node need, one per string: `type:struct X`,
    /// `field:struct X.f`, `enum:enum E.V`, `func:name`, `helper:<progtype>:<helper>`.
    /// Written by the operator.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub queries: Vec<String>,
}

/// What the agent found on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BpfNodeProfileStatus {
    /// The running kernel.
    #[serde(default)]
    pub kernel: KernelInfo,
    /// Machine architecture, e.g. `x86_64`.
    #[serde(default)]
    pub arch: String,
    /// Kernel BTF.
    #[serde(default)]
    pub btf: BtfInfo,
    /// Program types the feature probes report as supported (bpftool names).
    #[serde(default)]
    pub program_types: Vec<String>,
    /// Map types the feature probes report as supported (bpftool names).
    #[serde(default)]
    pub map_types: Vec<String>,
    /// Program types seen loading for real on this node. Probes can be wrong; a real load
    /// is the final test, so these count as supported whatever the probe said.
    #[serde(default)]
    pub observed_program_types: Vec<String>,
    /// Answers to `spec.queries`, query to true/false.
    #[serde(default)]
    pub answers: BTreeMap<String, bool>,
    /// Agent build that wrote this status.
    #[serde(default)]
    pub agent_version: String,
    /// When the probes ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_at: Option<String>,
}

/// Kernel release and its parsed version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct KernelInfo {
    /// `uname -r`, e.g. `6.1.0-54-cloud-amd64`.
    #[serde(default)]
    pub release: String,
    /// Parsed `major.minor.patch`, e.g. `6.1.0`.
    #[serde(default)]
    pub version: String,
}

/// Kernel BTF facts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct BtfInfo {
    /// Whether BTF could be read.
    #[serde(default)]
    pub available: bool,
    /// Where it was read from, e.g. `/sys/kernel/btf/vmlinux`.
    #[serde(default)]
    pub source: String,
    /// SHA-256 of the raw BTF; nodes with the same digest share answers.
    #[serde(default)]
    pub sha256: String,
    /// Number of BTF types.
    #[serde(default)]
    pub types: u32,
}
