//! Writing a program's status and announcing Events: conditions, the server-side apply of
//! status (a refusal is itself reported), and Events published once per key.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};

use bpfpoly_crds::BpfPolyProgram;

use crate::context::Context;
use crate::{Error, FIELD_MANAGER};

pub fn set_condition(
    conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    generation: i64,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let last = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(now, |c| c.last_transition_time.clone());
    conditions.retain(|c| c.type_ != type_);
    conditions.push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: last,
    });
}

/// Writes the status by server-side apply (no call when it is unchanged).
pub async fn write_status(
    ctx: &Context,
    p: &BpfPolyProgram,
    status: bpfpoly_crds::BpfPolyProgramStatus,
) -> Result<(), Error> {
    if p.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<BpfPolyProgram> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1",
        "kind": "BpfPolyProgram",
        "status": status,
    });
    match api
        .patch_status(
            &p.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if refused(&e) => {
            // The API server will refuse the same status again: say so where the user looks,
            // not only in the log, and retry slowly.
            ctx.metrics
                .status_writes_refused
                .with_label_values(&[&p.name_any()])
                .inc();
            tracing::error!(program = %p.name_any(), code = e.code, error = %e.message, "status write refused");
            announce(
                ctx,
                p,
                &format!("status-refused/{}", e.message),
                EventType::Warning,
                "StatusWriteRefused",
                &format!(
                    "the API server refused the operator's status ({} {}): {}",
                    e.code, e.reason, e.message
                ),
            )
            .await;
            Err(Error::StatusRefused(e.message))
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

/// A refusal that a retry cannot fix (the object or its schema), as opposed to a conflict,
/// a timeout or an unavailable server.
fn refused(e: &kube::core::Status) -> bool {
    matches!(e.code, 400 | 403 | 413 | 415 | 422)
}

/// Ready's message for a program whose selector matches no node.
pub fn no_nodes_message(p: &BpfPolyProgram) -> String {
    let selector = p
        .spec
        .node_selector
        .as_ref()
        .and_then(|s| serde_json::to_string(s).ok())
        .unwrap_or_else(|| "{}".into());
    format!("spec.nodeSelector {selector} matches no node: check its labels (kubectl get nodes --show-labels)")
}

/// Publishes an Event once per key.
pub async fn announce(
    ctx: &Context,
    p: &BpfPolyProgram,
    key: &str,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let key = format!("{}/{key}", p.name_any());
    {
        let mut seen = ctx
            .announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !seen.insert(key) {
            return;
        }
        if seen.len() > 100_000 {
            seen.clear();
        }
    }
    let mut note = note.to_string();
    if note.len() > 1000 {
        note.truncate(note.floor_char_boundary(1000));
    }
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    // Kubernetes 1.20 rejects events.k8s.io/v1 Events whose namespace differs from the
    // regarding object's; cluster-scoped programs get theirs in `default`.
    let mut reference = p.object_ref(&());
    reference.namespace = Some("default".into());
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        tracing::warn!(program = %p.name_any(), error = %e, "cannot publish Event");
    }
}
