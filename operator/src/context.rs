//! What the controller and the writer share: the caches, the targets the controller
//! publishes per program, the nodes waiting to be written, the recorder and the metrics.
//! Both import this module; neither imports the other.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bpfpoly_crds::state::AssignedProgram;
use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::ResourceExt;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// What one program wants on the nodes, as last decided.
#[derive(Clone, Debug, Default)]
pub struct ProgramTargets {
    /// Nodes that carry the current generation, with their assignment (shared by every
    /// node with the same facts).
    pub assignments: HashMap<String, Arc<AssignedProgram>>,
    /// Eligible nodes the rollout has not reached: they keep what they run.
    pub keep: HashSet<String>,
    /// BTF queries the program needs.
    pub queries: Vec<String>,
    /// Nodes asked to answer them (one per BTF build, plus nodes not yet reported).
    pub query_nodes: HashSet<String>,
}

/// Shared state of the controller and the writer.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Nodes.
    pub nodes: Store<Node>,
    /// Node profiles.
    pub profiles: Store<BpfNodeProfile>,
    /// Node states.
    pub states: Store<BpfNodeState>,
    /// Programs (the controller's own store).
    pub programs: Store<BpfPolyProgram>,
    /// Targets by program name.
    pub targets: std::sync::RwLock<HashMap<String, ProgramTargets>>,
    /// Nodes whose state or profile needs writing.
    pub dirty: Dirty,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Events already published, so a steady state does not repeat them.
    pub announced: std::sync::Mutex<HashSet<String>>,
    /// How long deletion waits for the agents.
    pub unload_timeout: Duration,
    /// Which agents are alive (their liveness Leases).
    pub liveness: Arc<crate::liveness::Liveness>,
    /// The writer's own recent writes (a cache that lags one is not written again).
    pub written: crate::written::Written,
}

/// Nodes waiting to be written, and a wake-up for the writer.
#[derive(Default)]
pub struct Dirty {
    nodes: std::sync::Mutex<BTreeSet<String>>,
    /// Wakes the writer when a node is newly marked.
    pub wake: Notify,
    /// Counts `mark` calls, so the writer can tell when reconciles have settled.
    pub marks: std::sync::atomic::AtomicU64,
}

impl Dirty {
    /// Marks nodes for writing.
    pub fn mark(&self, nodes: impl IntoIterator<Item = String>) {
        let mut set = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = set.len();
        set.extend(nodes);
        if set.len() != before {
            self.wake.notify_one();
        }
    }

    /// Takes every marked node.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect()
    }
}

impl Context {
    /// Replaces a program's targets and marks every node that held or holds it dirty.
    pub fn publish_targets(&self, name: &str, targets: ProgramTargets) {
        let mut touched: BTreeSet<String> = targets.keep.iter().cloned().collect();
        touched.extend(targets.query_nodes.iter().cloned());
        {
            let mut all = self
                .targets
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(old) = all.insert(name.to_string(), targets) {
                touched.extend(old.keep);
                touched.extend(old.query_nodes);
            }
        }
        // Nodes that still hold the program but are no longer selected.
        for s in self.states.state() {
            if s.spec.programs.iter().any(|a| a.name == name) {
                touched.insert(s.name_any());
            }
        }
        self.dirty.mark(touched);
    }
}
