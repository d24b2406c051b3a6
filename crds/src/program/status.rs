//! A program's status: what the operator observed of it across the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::conditions_schema;

/// Observed state of a program across the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BpfPolyProgramStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded and Unsupported, with reasons naming nodes and causes.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Node counts by outcome.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// How many nodes run each variant.
    #[serde(default)]
    pub variants: Vec<VariantCount>,
    /// Compact `variant=nodes` list for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant_summary: Option<String>,
    /// Rollout progress.
    #[serde(default)]
    pub rollout: RolloutStatus,
    /// A bounded sample of nodes that are not plainly Loaded, with reasons.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub samples: Vec<NodeSample>,
    /// Parts of the spec that are allowed but probably not meant (for example a config
    /// `fallback` without `requires`), each with its field path. The program runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub warnings: Vec<String>,
}

/// Node counts by outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct NodeCounts {
    /// Nodes matching the node selector.
    pub selected: u32,
    /// Selected nodes with at least one eligible variant.
    pub eligible: u32,
    /// Nodes running the program as intended.
    pub loaded: u32,
    /// Nodes running the program after a fallback.
    pub degraded: u32,
    /// Nodes where loading failed.
    pub failed: u32,
    /// Nodes with no eligible variant.
    pub unsupported: u32,
    /// Nodes not yet decided or not yet reported.
    pub pending: u32,
    /// Nodes whose agent stopped renewing its liveness Lease: what they last reported is
    /// not counted (see `samples` for since when).
    #[serde(default)]
    pub lost: u32,
}

/// Nodes running one variant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct VariantCount {
    /// Variant name.
    pub name: String,
    /// Nodes running it.
    pub nodes: u32,
}

/// Rollout progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Nodes whose state carries the current generation.
    pub updated_nodes: u32,
    /// True when the rollout stopped because too many updated nodes degraded.
    pub paused: bool,
    /// Why the rollout is where it is. Left out when empty: Kubernetes 1.20's server-side
    /// apply turns an empty string into null, which this schema's `type: string` refuses.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One node's outcome, with its reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NodeSample {
    /// Node name.
    pub node: String,
    /// Phase on that node.
    pub phase: String,
    /// Why.
    pub reason: String,
}
