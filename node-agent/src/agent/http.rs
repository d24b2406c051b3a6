//! The agent's `/metrics`, `/healthz` and `/readyz`: the registry rendered with the
//! kernel-side values of every running program, read at scrape time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bpfpoly_agent::loader::Loader;

use crate::metrics::{Metrics, ProgramSnapshot};

/// Config fields that fell back, per program (for `bpfpoly_config_fallbacks`).
pub(super) type ConfigFallbacks = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// `/metrics` renders the registry with the kernel-side values read at scrape time.
pub(super) async fn serve_http(
    addr: SocketAddr,
    metrics: Metrics,
    loader: Arc<Mutex<Loader>>,
    config_fallbacks: ConfigFallbacks,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), bpfpoly_runtime::BindError> {
    let render = move || {
        let metrics = metrics.clone();
        let loader = loader.clone();
        let cf = config_fallbacks.clone();
        async move {
            let snapshot = tokio::task::spawn_blocking(move || snapshot(&loader, &cf))
                .await
                .unwrap_or_default();
            metrics.render(&snapshot).map_err(|e| e.to_string())
        }
    };
    bpfpoly_runtime::serve_http(addr, render, ready, "not ready: profiling").await
}

/// Reads the kernel-side values of every running program (at scrape time).
fn snapshot(
    loader: &Mutex<Loader>,
    config_fallbacks: &Mutex<BTreeMap<String, Vec<String>>>,
) -> Vec<ProgramSnapshot> {
    let cf = config_fallbacks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let loader = loader
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loader
        .running()
        .map(|(name, info)| {
            let status = loader.status(name);
            let dispatch = loader
                .dispatch_counts(name)
                .map(|c| (c.per_key.into_iter().collect(), c.default));
            let runs = loader
                .run_stats(name)
                .unwrap_or_default()
                .into_iter()
                .map(|(prog, st)| (prog, st.run_time.as_nanos() as u64, st.run_count))
                .collect();
            ProgramSnapshot {
                program: name.to_string(),
                variant: info.variant.clone(),
                mechanism: info.mechanism.clone().unwrap_or_else(|| "none".into()),
                dispatch,
                runs,
                empty_slots: status
                    .map(|s| {
                        s.handlers
                            .iter()
                            .filter(|h| h.state != "Loaded")
                            .map(|h| h.key)
                            .collect()
                    })
                    .unwrap_or_default(),
                config_fallbacks: cf.get(name).cloned().unwrap_or_default(),
            }
        })
        .collect()
}
