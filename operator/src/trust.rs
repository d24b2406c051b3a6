//! Which node-reported status the operator believes. Pure.
//!
//! Every agent writes the status of its own node's `BpfNodeState` and `BpfNodeProfile` with
//! the field manager `bpfpoly-agent/<node>`. The API server records, per object, which
//! manager last wrote which fields (`metadata.managedFields`). A status owned by any other
//! manager (another node's agent, `kubectl`, a script) is ignored and reported, and so is a
//! status that contradicts its own assignment (a generation the operator never assigned, a
//! variant that was not a candidate).
//!
//! What this cannot catch: field manager names are chosen by the client, so an agent
//! credential that deliberately claims another node's manager name is not detected here. On
//! Kubernetes 1.20 the API gives no per-node identity for a DaemonSet's service account;
//! closing that gap needs admission control on the writer's identity (see the README's
//! security model).

use bpfpoly_crds::state::{agent_field_manager, AssignedProgram, Phase, ProgramStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};

/// Reduces `managedFields` to the entries that own part of `status`, each with a token
/// field set, which is all [`foreign_status_writers`] reads (the full entries are a large
/// share of a cached object).
pub fn keep_status_writers(meta: &mut ObjectMeta) {
    let Some(entries) = meta.managed_fields.take() else {
        return;
    };
    let kept: Vec<ManagedFieldsEntry> = entries
        .into_iter()
        .filter(owns_status)
        .map(|e| {
            // The status fields it owns, one level deep (their content is never read).
            let owned: serde_json::Map<String, serde_json::Value> = status_fields(&e)
                .map(|f| {
                    f.keys()
                        .map(|k| (k.clone(), serde_json::json!({})))
                        .collect()
                })
                .unwrap_or_default();
            ManagedFieldsEntry {
                manager: e.manager,
                operation: e.operation,
                fields_v1: Some(FieldsV1(serde_json::json!({ "f:status": owned }))),
                ..ManagedFieldsEntry::default()
            }
        })
        .collect();
    meta.managed_fields = (!kept.is_empty()).then_some(kept);
}

fn status_fields(e: &ManagedFieldsEntry) -> Option<&serde_json::Map<String, serde_json::Value>> {
    e.fields_v1
        .as_ref()?
        .0
        .as_object()?
        .get("f:status")?
        .as_object()
}

/// True when the entry owns a value inside `status`. An empty `f:status` (or one holding only
/// the `.` marker) owns none: the API server records one for the manager that created the
/// object, e.g. `before-first-apply` when an object without managedFields is first applied.
fn owns_status(e: &ManagedFieldsEntry) -> bool {
    status_fields(e).is_some_and(|f| f.keys().any(|k| k != "."))
}

/// The API server's name for fields whose writer it did not record. Kubernetes 1.20 records
/// no managedFields for a server-side apply that creates a custom object with an empty spec
/// (as an agent creates its profile), and the next apply then files every field present at
/// that moment, including the agent's own status, under this name.
const UNKNOWN_WRITER: &str = "before-first-apply";

/// Field managers other than `node`'s own agent that own part of the object's status, each
/// once, in the order recorded. Fields of unknown writer count as foreign only when the node's
/// agent owns no status field beside them.
pub fn foreign_status_writers(node: &str, meta: &ObjectMeta) -> Vec<String> {
    let own = agent_field_manager(node);
    let writers: Vec<&ManagedFieldsEntry> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| owns_status(e))
        .collect();
    let agent_wrote = writers.iter().any(|e| e.manager.as_deref() == Some(&own));
    let mut foreign: Vec<String> = Vec::new();
    for e in writers {
        let manager = e.manager.clone().unwrap_or_else(|| "(unnamed)".into());
        if agent_wrote && manager == UNKNOWN_WRITER {
            continue;
        }
        if manager != own && !foreign.contains(&manager) {
            foreign.push(manager);
        }
    }
    foreign
}

/// Why the status of `node` is not believed, or `None` when its own agent wrote all of it.
pub fn untrusted_status(node: &str, meta: &ObjectMeta) -> Option<String> {
    let foreign = foreign_status_writers(node, meta);
    if foreign.is_empty() {
        return None;
    }
    let quoted: Vec<String> = foreign.iter().map(|m| format!("{m:?}")).collect();
    Some(format!(
        "status written by field manager {}, not by this node's agent ({:?}); ignored",
        quoted.join(", "),
        agent_field_manager(node)
    ))
}

/// Why one program's reported status contradicts what was assigned to the node, if it does.
/// `assigned` is the node's current assignment of that program, when it has one.
pub fn inconsistent_entry(
    assigned: Option<&AssignedProgram>,
    reported: &ProgramStatus,
) -> Option<String> {
    let a = assigned?;
    if reported.observed_generation > a.generation {
        return Some(format!(
            "reports generation {} of {:?}, but generation {} is the newest assigned to it; ignored",
            reported.observed_generation, reported.name, a.generation
        ));
    }
    if reported.observed_generation == a.generation
        && matches!(reported.phase, Phase::Loaded | Phase::Degraded)
    {
        if let Some(v) = &reported.variant {
            if !a.variants.contains(v) {
                let names: Vec<&str> = a.variants.iter().map(String::as_str).collect();
                return Some(format!(
                    "reports variant {v:?} of {:?}, which is not among its candidates [{}]; ignored",
                    reported.name,
                    names.join(", ")
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(manager: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    fn meta(entries: Vec<ManagedFieldsEntry>) -> ObjectMeta {
        ObjectMeta {
            name: Some("n1".into()),
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        }
    }

    fn agent_status_fields() -> serde_json::Value {
        serde_json::json!({"f:status": {"f:programs": {}, "f:summary": {"f:loaded": {}}}})
    }

    #[test]
    fn own_agent_and_spec_writers_are_trusted() {
        let m = meta(vec![
            entry(
                "bpfpoly-operator",
                serde_json::json!({"f:spec": {"f:programs": {}}}),
            ),
            entry("bpfpoly-agent/n1", agent_status_fields()),
            // Seen on Kubernetes 1.20: the creator of an object later applied keeps an empty
            // status entry, which owns no status value.
            entry(
                "before-first-apply",
                serde_json::json!({"f:spec": {".": {}, "f:queries": {}}, "f:status": {}}),
            ),
            entry("kubectl-create", serde_json::json!({"f:status": {".": {}}})),
        ]);
        assert_eq!(untrusted_status("n1", &m), None);
        assert_eq!(untrusted_status("n1", &ObjectMeta::default()), None);
        // Fields of unknown writer beside the agent's own (Kubernetes 1.20 after a managedFields
        // reset) are the agent's; alone, they are not.
        let beside = meta(vec![
            entry("bpfpoly-agent/n1", agent_status_fields()),
            entry("before-first-apply", agent_status_fields()),
        ]);
        assert_eq!(untrusted_status("n1", &beside), None);
        let alone = meta(vec![entry("before-first-apply", agent_status_fields())]);
        assert_eq!(
            foreign_status_writers("n1", &alone),
            vec!["before-first-apply".to_string()]
        );
    }

    #[test]
    fn another_nodes_agent_or_a_person_is_named() {
        let m = meta(vec![
            entry("bpfpoly-agent/n1", agent_status_fields()),
            entry(
                "bpfpoly-agent/n2",
                serde_json::json!({"f:status": {"f:programs": {}}}),
            ),
            entry(
                "kubectl-edit",
                serde_json::json!({"f:status": {"f:summary": {}}}),
            ),
            entry(
                "bpfpoly-agent/n2",
                serde_json::json!({"f:status": {"f:summary": {}}}),
            ),
        ]);
        assert_eq!(
            foreign_status_writers("n1", &m),
            vec!["bpfpoly-agent/n2".to_string(), "kubectl-edit".to_string()]
        );
        let why = untrusted_status("n1", &m).unwrap();
        assert!(why.contains("\"bpfpoly-agent/n2\""), "{why}");
        assert!(why.contains("\"bpfpoly-agent/n1\""), "{why}");
    }

    #[test]
    fn pruning_keeps_exactly_the_status_writers() {
        let mut m = meta(vec![
            entry("bpfpoly-operator", serde_json::json!({"f:spec": {}})),
            entry("bpfpoly-agent/n9", agent_status_fields()),
        ]);
        let before = foreign_status_writers("n1", &m);
        keep_status_writers(&mut m);
        assert_eq!(m.managed_fields.as_ref().map(Vec::len), Some(1));
        assert_eq!(foreign_status_writers("n1", &m), before);
        let mut spec_only = meta(vec![entry(
            "bpfpoly-operator",
            serde_json::json!({"f:spec": {}}),
        )]);
        keep_status_writers(&mut spec_only);
        assert_eq!(spec_only.managed_fields, None);
    }

    fn assignment(generation: i64, variants: &[&str]) -> AssignedProgram {
        AssignedProgram {
            name: "p".into(),
            generation,
            variants: variants.iter().map(ToString::to_string).collect(),
            config_fallbacks: vec![],
        }
    }

    fn reported(generation: i64, phase: Phase, variant: Option<&str>) -> ProgramStatus {
        ProgramStatus {
            name: "p".into(),
            observed_generation: generation,
            phase,
            variant: variant.map(Into::into),
            ..ProgramStatus::default()
        }
    }

    #[test]
    fn entries_that_contradict_the_assignment_are_refused() {
        let a = assignment(3, &["xdp", "tc"]);
        assert_eq!(
            inconsistent_entry(Some(&a), &reported(3, Phase::Loaded, Some("tc"))),
            None
        );
        // An older generation may run any variant it was given then.
        assert_eq!(
            inconsistent_entry(Some(&a), &reported(2, Phase::Loaded, Some("old"))),
            None
        );
        assert_eq!(
            inconsistent_entry(Some(&a), &reported(3, Phase::Failed, None)),
            None
        );
        assert_eq!(
            inconsistent_entry(None, &reported(9, Phase::Loaded, Some("x"))),
            None
        );
        let ahead = inconsistent_entry(Some(&a), &reported(4, Phase::Loaded, Some("xdp"))).unwrap();
        assert!(ahead.contains("generation 4"), "{ahead}");
        let stranger =
            inconsistent_entry(Some(&a), &reported(3, Phase::Degraded, Some("kprobe"))).unwrap();
        assert!(
            stranger.contains("\"kprobe\"") && stranger.contains("[xdp, tc]"),
            "{stranger}"
        );
    }
}
