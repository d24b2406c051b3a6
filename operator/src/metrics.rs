//! Operator metrics (served on `/metrics`).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The operator's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    /// Registry to encode on scrape.
    pub registry: Registry,
    /// Duration of one program reconcile.
    pub reconcile_duration: Histogram,
    /// Failed reconciles and node writes, by kind.
    pub reconcile_errors: IntCounterVec,
    /// Nodes per program and phase.
    pub nodes: IntGaugeVec,
    /// 1 when a program's rollout is paused.
    pub rollout_paused: IntGaugeVec,
    /// Server-side applies of node states and profiles.
    pub node_writes: IntCounter,
    /// Node states and profiles whose status is currently ignored, by kind.
    pub ignored_node_status: IntGaugeVec,
    /// Program status writes the API server refused (a schema mismatch is a bug), by program.
    pub status_writes_refused: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "bpfpoly_reconcile_duration_seconds",
                "Time to reconcile one BpfPolyProgram",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "bpfpoly_reconcile_errors_total",
                "Failed reconciles and node writes",
            ),
            &["kind"],
        )?;
        let nodes = IntGaugeVec::new(
            Opts::new("bpfpoly_nodes", "Nodes per program and phase"),
            &["program", "phase"],
        )?;
        let rollout_paused = IntGaugeVec::new(
            Opts::new(
                "bpfpoly_rollout_paused",
                "1 when the program's rollout is paused",
            ),
            &["program"],
        )?;
        let node_writes = IntCounter::new(
            "bpfpoly_node_writes_total",
            "Server-side applies of BpfNodeState and BpfNodeProfile specs",
        )?;
        let ignored_node_status = IntGaugeVec::new(
            Opts::new(
                "bpfpoly_ignored_node_status",
                "Node states and profiles whose status is ignored because a field manager other than the node's own agent wrote part of it",
            ),
            &["kind"],
        )?;
        let status_writes_refused = IntCounterVec::new(
            Opts::new(
                "bpfpoly_status_writes_refused_total",
                "BpfPolyProgram status writes the API server refused (not conflicts or timeouts)",
            ),
            &["program"],
        )?;
        registry.register(Box::new(status_writes_refused.clone()))?;
        registry.register(Box::new(ignored_node_status.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(rollout_paused.clone()))?;
        registry.register(Box::new(node_writes.clone()))?;
        Ok(Metrics {
            registry,
            reconcile_duration,
            reconcile_errors,
            nodes,
            rollout_paused,
            node_writes,
            ignored_node_status,
            status_writes_refused,
        })
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let families = self.registry.gather();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}
