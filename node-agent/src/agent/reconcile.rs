//! One pass over the node's state: each assignment applied through the loader (or left to
//! its backoff), each program no longer assigned detached and unpinned, and the statuses
//! of all of them reported.

use std::collections::BTreeSet;

use bpfpoly_agent::fetch::Prefetched;
use bpfpoly_agent::loader::{assignment_digest, Applied, Outcome};
use bpfpoly_crds::program::Bytecode;
use bpfpoly_crds::state::{Phase, ProgramAssignment, ProgramStatus};
use bpfpoly_crds::BpfNodeState;

use super::resolve::Entry;
use super::Agent;
use crate::retry::Attempt;

impl Agent {
    /// Applies the node's assignments and reports status.
    pub(super) async fn reconcile(&mut self, state: &BpfNodeState) {
        let mut desired: Vec<ProgramAssignment> = Vec::new();
        let mut statuses: Vec<ProgramStatus> = Vec::new();
        for entry in self.resolved.pass(&state.spec.programs, &self.programs) {
            match entry {
                Entry::Ready(a) => desired.push(self.aliased(&a)),
                Entry::Waiting(status) => statuses.push(self.still_running(status)),
            }
        }
        self.note_config_fallbacks(&desired);
        for a in &desired {
            if let Some(status) = self.apply_one(a).await {
                statuses.push(status);
            }
        }
        // A program that waits for its definition is still wanted: what runs stays.
        let wanted: BTreeSet<&str> = state
            .spec
            .programs
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        self.backoff.retain(|name| wanted.contains(name));
        self.unload_unassigned(&wanted);
        // Report Unloaded until the operator stops asking; then forget.
        self.unloaded.retain(|n, _| !wanted.contains(n.as_str()));
        statuses.extend(self.unloaded.values().cloned());
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        self.report(statuses).await;
        // Keep reporting Unloaded entries only for one round.
        self.unloaded.clear();
    }

    /// The status of a program waiting for its definition, saying what keeps running.
    fn still_running(&self, mut status: ProgramStatus) -> ProgramStatus {
        let running = self
            .loader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .running()
            .any(|(name, _)| name == status.name);
        if running {
            status
                .message
                .push_str("; the version loaded before keeps running");
        }
        tracing::info!(program = %status.name, generation = status.observed_generation,
            why = %status.message, "waiting for the program's definition");
        status
    }

    /// The config fields that fell back, per program, for `bpfpoly_config_fallbacks`.
    fn note_config_fallbacks(&self, desired: &[ProgramAssignment]) {
        *self
            .config_fallbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = desired
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    a.config
                        .iter()
                        .filter(|c| c.fell_back)
                        .map(|c| c.name.clone())
                        .collect(),
                )
            })
            .collect();
    }

    /// Applies one assignment (unless it waits for its next try) and records what came of
    /// it: the status to report, or `None` when the load task itself failed.
    async fn apply_one(&mut self, a: &ProgramAssignment) -> Option<ProgramStatus> {
        let attempt = Attempt {
            digest: assignment_digest(a),
            generation: a.generation,
        };
        // A failed assignment waits for its next try: report what its last try said.
        if let Some(last) = self
            .backoff
            .waiting(&a.name, &attempt, std::time::Instant::now())
        {
            return Some(last.clone());
        }
        let applied = match self.load(a, &attempt.digest).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(program = %a.name, error = %e, "load task failed");
                return None;
            }
        };
        if applied.outcome != Outcome::Unchanged {
            self.metrics
                .load_duration
                .observe(applied.duration.as_secs_f64());
            tracing::info!(program = %a.name, outcome = ?applied.outcome, phase = ?applied.status.phase,
                variant = ?applied.status.variant, ms = applied.duration.as_millis() as u64, "applied");
        }
        match applied.outcome {
            Outcome::Failed | Outcome::KeptPrevious => {
                let delay = self.backoff.failed(
                    &a.name,
                    attempt,
                    std::time::Instant::now(),
                    applied.status.clone(),
                );
                tracing::info!(program = %a.name, generation = a.generation,
                    retry_in_s = delay.as_secs(), "load failed; trying again later");
            }
            Outcome::Loaded | Outcome::Updated | Outcome::Unchanged => {
                self.backoff.succeeded(&a.name);
            }
        }
        self.record(a, &applied.status, &applied.fallbacks, applied.outcome)
            .await;
        Some(applied.status)
    }

    /// The loader's apply, on a blocking task, with the bytecode fetched first unless the
    /// assignment runs already at `digest` (the loader then finds it unchanged).
    async fn load(
        &self,
        a: &ProgramAssignment,
        digest: &str,
    ) -> Result<Applied, tokio::task::JoinError> {
        let running = self
            .loader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .running()
            .any(|(name, info)| name == a.name && info.digest == digest);
        let fetched = if running {
            Prefetched::default()
        } else {
            self.prefetch(a).await
        };
        let loader = self.loader.clone();
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            let fetch = |b: &Bytecode| fetched.get(b);
            let mut l = loader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l.apply(&a, &fetch)
        })
        .await
    }

    /// Programs no longer assigned: detached and unpinned, each kept for one report.
    fn unload_unassigned(&mut self, wanted: &BTreeSet<&str>) {
        let running: Vec<String> = {
            let l = self
                .loader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l.running()
                .map(|(n, _)| n.to_string())
                .filter(|n| !wanted.contains(n.as_str()))
                .collect()
        };
        for name in running {
            let removed = {
                let mut l = self
                    .loader
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                l.remove(&name)
            };
            let mut st = ProgramStatus {
                name: name.clone(),
                ..ProgramStatus::default()
            };
            match removed {
                Ok(()) => {
                    st.phase = Phase::Unloaded;
                    st.message = "removed from this node: detached and unpinned".into();
                    self.metrics.forget(&name);
                    tracing::info!(program = %name, "unloaded");
                }
                Err(e) => {
                    st.phase = Phase::Failed;
                    st.message = format!("unload failed: {e}");
                    tracing::warn!(program = %name, error = %e, "unload failed");
                }
            }
            st.last_transition_time = Some(k8s_openapi::jiff::Timestamp::now().to_string());
            self.unloaded.insert(name, st);
        }
    }
}
