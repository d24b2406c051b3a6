//! What the agent tells: metrics and Events for each applied program, the observed program
//! types in the profile, and the node state's status.

use bpfpoly_agent::loader::Outcome;
use bpfpoly_crds::select::attach_program_type;
use bpfpoly_crds::state::{
    agent_field_manager, FallbackRecord, FallbackStage, Phase, ProgramAssignment, ProgramStatus,
    StateSummary,
};
use bpfpoly_crds::{BpfNodeState, BpfNodeStateStatus};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};

use super::Agent;

impl Agent {
    /// Metrics, Events and observed program types for one applied program.
    pub(super) async fn record(
        &mut self,
        a: &ProgramAssignment,
        status: &ProgramStatus,
        fallbacks: &[FallbackRecord],
        outcome: Outcome,
    ) {
        self.observe_program_types(a, status).await;
        if outcome != Outcome::Unchanged {
            self.count_fallbacks(a, fallbacks).await;
            self.announce(a, status, outcome).await;
        }
    }

    /// The program types of the variant that runs join the profile's observed types (the
    /// profile is published again when that adds one).
    async fn observe_program_types(&mut self, a: &ProgramAssignment, status: &ProgramStatus) {
        if matches!(status.phase, Phase::Loaded | Phase::Degraded) {
            if let Some(v) = a
                .candidates
                .iter()
                .find(|v| Some(&v.name) == status.variant.as_ref())
            {
                let before = self.observed.len();
                self.observed.extend(
                    v.programs
                        .iter()
                        .filter_map(|p| p.attach.as_ref())
                        .map(|at| attach_program_type(at).to_string()),
                );
                if self.observed.len() != before {
                    if let Ok(Some(p)) = self.api_profiles().get_opt(&self.opts.node_name).await {
                        if let Some(s) = p.status {
                            if let Err(e) = self.publish_profile(s, false).await {
                                tracing::warn!(error = %e, "cannot publish observed program types");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each degradation counted in the metrics and told in a Warning Event.
    async fn count_fallbacks(&self, a: &ProgramAssignment, fallbacks: &[FallbackRecord]) {
        for f in fallbacks {
            let stage = f.stage.to_string();
            self.metrics.count_fallback(&a.name, &f.from, &f.to, &stage);
            if f.stage == FallbackStage::Verify && f.verifier_log.is_some() {
                self.metrics.count_rejection(&a.name, &f.from);
            }
            let reason = match f.stage {
                FallbackStage::Verify => "VerifierRejected",
                FallbackStage::Attach => "AttachFailed",
                FallbackStage::Handler => "HandlerRejected",
            };
            self.event(
                &a.name,
                EventType::Warning,
                reason,
                &format!(
                    "node {}: {} -> {} at {}: {}",
                    self.opts.node_name, f.from, f.to, f.stage, f.reason
                ),
            )
            .await;
        }
    }

    /// The outcome told in an Event: update failed, load failed, or which variant runs.
    async fn announce(&self, a: &ProgramAssignment, status: &ProgramStatus, outcome: Outcome) {
        match (outcome, status.phase) {
            (Outcome::KeptPrevious, _) => {
                self.event(
                    &a.name,
                    EventType::Warning,
                    "UpdateFailed",
                    &format!(
                        "node {}: update to generation {} failed, previous version kept: {}",
                        self.opts.node_name, a.generation, status.message
                    ),
                )
                .await;
            }
            (_, Phase::Failed) => {
                self.event(
                    &a.name,
                    EventType::Warning,
                    "LoadFailed",
                    &format!("node {}: {}", self.opts.node_name, status.message),
                )
                .await;
            }
            (_, Phase::Loaded | Phase::Degraded) => {
                self.event(
                    &a.name,
                    EventType::Normal,
                    "Loaded",
                    &format!(
                        "node {}: variant {} running ({:?})",
                        self.opts.node_name,
                        status.variant.as_deref().unwrap_or("-"),
                        status.phase
                    ),
                )
                .await;
            }
            _ => {}
        }
    }

    async fn event(&self, program: &str, type_: EventType, reason: &str, note: &str) {
        let mut note = note.to_string();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("bpfpoly.io/v1alpha1".into()),
            kind: Some("BpfPolyProgram".into()),
            name: Some(program.into()),
            // Kubernetes 1.20 wants the Event's namespace on the reference; programs are
            // cluster-scoped, so their Events live in `default`.
            namespace: Some("default".into()),
            ..Default::default()
        };
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Load".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(%program, error = %e, "cannot publish Event");
        }
    }

    pub(super) async fn report(&self, programs: Vec<ProgramStatus>) {
        let summary = StateSummary {
            programs: programs
                .iter()
                .filter(|p| p.phase != Phase::Unloaded)
                .count() as u32,
            loaded: programs.iter().filter(|p| p.phase == Phase::Loaded).count() as u32,
            degraded: programs
                .iter()
                .filter(|p| p.phase == Phase::Degraded)
                .count() as u32,
            failed: programs.iter().filter(|p| p.phase == Phase::Failed).count() as u32,
        };
        let status = BpfNodeStateStatus {
            programs,
            summary,
            boot_id: self.boot_id.clone(),
        };
        let api: Api<BpfNodeState> = Api::all(self.client.clone());
        let patch = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState", "status": status});
        if let Err(e) = api
            .patch_status(
                &self.opts.node_name,
                &PatchParams::apply(&agent_field_manager(&self.opts.node_name)).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot report status");
        }
    }
}
