//! The node's profile: published at start, re-published when a program type is first seen
//! loading, and the operator's queries answered when they change.

use bpfpoly_crds::requirement::Query;
use bpfpoly_crds::state::agent_field_manager;
use bpfpoly_crds::{BpfNodeProfile, BpfNodeProfileStatus};
use kube::api::{Api, Patch, PatchParams};

use super::{Agent, AgentError};
use crate::{probe, profile};

impl Agent {
    pub(super) fn api_profiles(&self) -> Api<BpfNodeProfile> {
        Api::all(self.client.clone())
    }

    /// Publishes the profile status (creating the object first when needed).
    pub(super) async fn publish_profile(
        &mut self,
        mut status: BpfNodeProfileStatus,
        create: bool,
    ) -> Result<(), AgentError> {
        let api = self.api_profiles();
        let name = &self.opts.node_name;
        // The operator believes a node's status only when this manager wrote it.
        let manager = agent_field_manager(name);
        let pp = PatchParams::apply(&manager).force();
        if create && api.get_opt(name).await?.is_none() {
            let obj = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
                "metadata": {"name": name}, "spec": {}});
            api.patch(name, &pp, &Patch::Apply(&obj)).await?;
        }
        status.observed_program_types = self.observed.iter().cloned().collect();
        status.agent_version = env!("CARGO_PKG_VERSION").to_string();
        let mut status = serde_json::to_value(&status)
            .map_err(|e| AgentError::Client(format!("profile status: {e}")))?;
        if status["answers"].as_object().is_some_and(|a| a.is_empty()) {
            // Kubernetes 1.20's server-side apply turns a map whose last owned keys are
            // removed into null, which the schema refuses (422), e.g. on a restart after the
            // node answered queries: clear it with a merge patch and leave it out of the apply.
            if let Some(s) = status.as_object_mut() {
                s.remove("answers");
            }
            let clear = serde_json::json!({"status": {"answers": null}});
            let merge = PatchParams {
                field_manager: Some(manager.clone()),
                ..PatchParams::default()
            };
            api.patch_status(name, &merge, &Patch::Merge(&clear))
                .await?;
        }
        let patch = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "status": status});
        api.patch_status(name, &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    /// Answers `spec.queries` when they change.
    pub(super) async fn answer(&mut self, p: &BpfNodeProfile) {
        if p.spec.queries == self.answered
            && p.status
                .as_ref()
                .is_some_and(|s| !s.kernel.release.is_empty())
        {
            return;
        }
        let queries: Vec<Query> = p
            .spec
            .queries
            .iter()
            .filter_map(|q| match Query::parse(q) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(query = %q, error = %e, "ignoring a malformed query");
                    None
                }
            })
            .collect();
        let kbtf = self.kbtf.clone();
        let running_btf = self.btf_is_running_kernel;
        let release = self.release.clone();
        let built = tokio::task::spawn_blocking(move || {
            let probed = probe::probe_all(&queries, || match &kbtf {
                Some(b) if running_btf => probe::AttachTargets::from_btf(b),
                _ => probe::AttachTargets::from_running_kernel(),
            });
            let mut status = profile::build_profile(kbtf.as_deref(), &release, &queries, &probed).0;
            if let Some(b) = &kbtf {
                status.btf.source = b.source().display().to_string();
            }
            status
        })
        .await;
        match built {
            Ok(status) => {
                let n = status.answers.len();
                match self.publish_profile(status, false).await {
                    Ok(()) => {
                        tracing::info!(answers = n, "answered the operator's queries");
                        self.answered = p.spec.queries.clone();
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot publish answers"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "answering task failed"),
        }
    }
}
