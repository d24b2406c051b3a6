//! The `BpfPolyProgram` controller: the finalizer around each reconcile, its error policy,
//! and the unload on deletion. Applying a program (per-node decisions, rollout waves, status,
//! Events) is [`crate::apply`]; node states and profiles are written by [`crate::writer`],
//! one patch per node, from the targets published in the [`Context`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bpfpoly_crds::state::Phase;
use bpfpoly_crds::BpfPolyProgram;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

pub use crate::context::{Context, ProgramTargets};
use crate::status::{announce, set_condition, write_status};
use crate::Error;

/// Finalizer that makes deletion wait for the agents to unload.
pub const FINALIZER: &str = "bpfpoly.io/unload";

/// Reconciles one program.
pub async fn reconcile(obj: Arc<BpfPolyProgram>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<BpfPolyProgram> = Api::all(ctx.client.clone());
    let obj = ensure_finalizer(&api, obj).await?;
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(p) => crate::apply::apply(p, &ctx).await,
            Finalizer::Cleanup(p) => cleanup(p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Adds the finalizer with a merge patch guarded by the resourceVersion. (kube's helper uses
/// a JSON patch `test` of a missing path, which Kubernetes 1.20 rejects with 422.)
async fn ensure_finalizer(
    api: &Api<BpfPolyProgram>,
    obj: Arc<BpfPolyProgram>,
) -> Result<Arc<BpfPolyProgram>, Error> {
    if obj.metadata.deletion_timestamp.is_some() || obj.finalizers().iter().any(|f| f == FINALIZER)
    {
        return Ok(obj);
    }
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": obj.resource_version(),
    }});
    let updated = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    Ok(Arc::new(updated))
}

/// Requeue on error, with the error counted by kind.
pub fn error_policy(obj: Arc<BpfPolyProgram>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Finalizer(inner) = err {
        if let kube::runtime::finalizer::Error::CleanupFailed(Error::UnloadPending(nodes)) =
            inner.as_ref()
        {
            tracing::info!(program = %obj.name_any(), %nodes, "waiting for agents to unload");
            return Action::requeue(Duration::from_secs(1));
        }
    }
    if let Error::Finalizer(inner) = err {
        if let kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) =
            inner.as_ref()
        {
            if s.code == 404 {
                // Deleted between the unload and the finalizer's removal: done, not a failure.
                tracing::debug!(program = %obj.name_any(), "gone before its finalizer was removed");
                return Action::await_change();
            }
        }
    }
    tracing::warn!(program = %obj.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.metric_label()])
        .inc();
    let unwrapped = match err {
        Error::Finalizer(inner) => match inner.as_ref() {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            _ => err,
        },
        e => e,
    };
    if matches!(unwrapped, Error::StatusRefused(_)) {
        return Action::requeue(Duration::from_secs(60));
    }
    Action::requeue(Duration::from_secs(5))
}

async fn cleanup(p: Arc<BpfPolyProgram>, ctx: &Context) -> Result<Action, Error> {
    let name = p.name_any();
    ctx.publish_targets(&name, ProgramTargets::default());
    // Wait until no node still lists it in spec, or reports it as anything but Unloaded.
    let waiting: Vec<String> = ctx
        .states
        .state()
        .iter()
        .filter(|s| {
            // A status the operator does not believe cannot confirm an unload.
            let believed = crate::trust::untrusted_status(&s.name_any(), &s.metadata).is_none();
            s.spec.programs.iter().any(|a| a.name == name)
                || s.status.as_ref().is_some_and(|st| {
                    st.programs
                        .iter()
                        .any(|ps| ps.name == name && (ps.phase != Phase::Unloaded || !believed))
                })
        })
        .map(|s| s.name_any())
        .collect();
    if waiting.is_empty() {
        forget(ctx, &name);
        return Ok(Action::await_change());
    }
    let since = p
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    if since > ctx.unload_timeout {
        let msg = format!(
            "gave up waiting {}s for node(s) {} to unload; their agents may be down, and `bpfpoly-agent cleanup` removes what is left",
            ctx.unload_timeout.as_secs(),
            waiting.join(", ")
        );
        announce(
            ctx,
            &p,
            "unload-timeout",
            EventType::Warning,
            "UnloadTimeout",
            &msg,
        )
        .await;
        let mut status = p.status.clone().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            p.metadata.generation.unwrap_or(0),
            "Ready",
            false,
            "UnloadTimeout",
            &msg,
        );
        let _ = write_status(ctx, &p, status).await;
        forget(ctx, &name);
        return Ok(Action::await_change());
    }
    Err(Error::UnloadPending(waiting.join(", ")))
}

/// Drops a deleted program's targets and its metric series.
fn forget(ctx: &Context, name: &str) {
    ctx.targets
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(name);
    for phase in [
        "selected",
        "loaded",
        "degraded",
        "failed",
        "unsupported",
        "pending",
        "lost",
    ] {
        let _ = ctx.metrics.nodes.remove_label_values(&[name, phase]);
    }
    let _ = ctx.metrics.rollout_paused.remove_label_values(&[name]);
    let _ = ctx
        .metrics
        .status_writes_refused
        .remove_label_values(&[name]);
}
