//! The bpfpoly operator: BTF-gated, per-node variant selection and safe rollout.

pub mod aggregate;
pub mod apply;
pub mod context;
pub mod controller;
pub mod explain;
pub mod facts;
pub mod intern;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod preflight;
pub mod rollout;
pub mod run;
pub mod selector;
pub mod status;
pub mod trust;
pub mod unload;
pub mod writer;
pub mod written;

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "bpfpoly-operator";

/// Everything that can fail in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// Deletion waits for these nodes' agents to report the program Unloaded. Returned as an
    /// error so the finalizer stays until they do (or the timeout passes).
    #[error("waiting for node(s) {0} to unload")]
    UnloadPending(String),
    /// The API server refused the program's status (not a conflict or a timeout): retrying
    /// the same status cannot succeed, so retries are slow.
    #[error("status refused by the API server: {0}")]
    StatusRefused(String),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A bounded label for the error counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::UnloadPending(_) => "unload_pending",
            Error::StatusRefused(_) => "status_refused",
            Error::Finalizer(_) => "finalizer",
        }
    }
}
