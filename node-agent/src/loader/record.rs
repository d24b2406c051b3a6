//! Recording the outcome of an apply: a candidate that made it becomes the running
//! version (its status, its record pinned in `meta`, the previous version retired, the
//! dispatch counters carried over); when nothing made it, the previous version is kept
//! or removed as the policy says.

use std::fs;

use bpfpoly_crds::state::{FallbackRecord, FallbackStage, Phase, ProgramAssignment, ProgramStatus};
use tracing::warn;

use super::{
    attach,
    attempt::Success,
    counters, pins,
    report::{bound, running_message, unix_ms},
    DispatchCounts, Loader, Outcome, Record, Running, RunningInfo,
};

impl Loader {
    /// Records a successful candidate and retires the previous version.
    pub(super) fn commit(
        &mut self,
        a: &ProgramAssignment,
        digest: &str,
        success: Success,
    ) -> (ProgramStatus, Outcome) {
        let Success {
            index,
            earlier: mut fallbacks,
            since_first_failure: _,
            loaded,
            links,
            changes,
        } = success;
        let dir = self.program_dir(&a.name).join(digest);
        let variant = &a.candidates[index];
        fallbacks.extend(loaded.fallbacks.iter().cloned());
        let all_handlers = loaded.handlers.iter().all(|h| h.state == "Loaded");
        let phase = if index == 0 && fallbacks.is_empty() && all_handlers {
            Phase::Loaded
        } else {
            Phase::Degraded
        };
        let info = RunningInfo {
            digest: digest.to_owned(),
            generation: a.generation,
            variant: variant.name.clone(),
            mechanism: loaded.mechanism.map(|m| m.as_str().to_owned()),
            programs: loaded.program_ids.clone(),
            links,
            dispatch_keys: loaded.dispatch_keys.clone(),
            pin_dir: dir.clone(),
        };
        let message = running_message(&info, &loaded.handlers, &fallbacks, &a.config);
        let status = ProgramStatus {
            name: a.name.clone(),
            observed_generation: a.generation,
            phase,
            variant: Some(variant.name.clone()),
            mechanism: info.mechanism.clone(),
            handlers: loaded.handlers.clone(),
            fallbacks: bound(fallbacks),
            program_ids: info.program_ids(),
            message,
            last_transition_time: None,
        };
        if let Err(e) = write_record(a, &status, &info) {
            // Unrecorded pins could not be adopted after a restart: undo the attempt.
            let errors = attach::revert(changes);
            drop(loaded);
            let _ = pins::remove_dir(&dir);
            return self.unrecorded(a, &status, &variant.name, &e, &errors);
        }
        // Pinned and recorded: our handles can go.
        drop(loaded);
        let (outcome, carried) = self.retire_previous(&a.name);
        let counters = counters::open(&dir);
        self.running.insert(
            a.name.clone(),
            Running {
                info,
                status: status.clone(),
                counters,
                carried,
            },
        );
        (status, outcome)
    }

    /// Writing the record failed: the attempt is undone, and this is why.
    fn unrecorded(
        &mut self,
        a: &ProgramAssignment,
        status: &ProgramStatus,
        variant: &str,
        error: &str,
        revert_errors: &[String],
    ) -> (ProgramStatus, Outcome) {
        let mut fallbacks = status.fallbacks.clone();
        fallbacks.push(FallbackRecord {
            from: variant.to_owned(),
            to: "none".to_owned(),
            stage: FallbackStage::Attach,
            reason: format!("recording the pins failed: {error}"),
            verifier_log: None,
        });
        let cause = if revert_errors.is_empty() {
            None
        } else {
            Some(format!(
                "restoring the running version failed: {}",
                revert_errors.join("; ")
            ))
        };
        self.fail(a, fallbacks, cause)
    }

    /// Removes the previous version of `name`, if any: its links already run the new
    /// one. Returns whether this was an update, and the counts to carry over.
    fn retire_previous(&mut self, name: &str) -> (Outcome, DispatchCounts) {
        let Some(old) = self.running.remove(name) else {
            return (Outcome::Loaded, DispatchCounts::default());
        };
        let carried = counters::carried_over(&old);
        drop(old.counters);
        if let Err(e) = pins::remove_dir(&old.info.pin_dir) {
            warn!(program = %name, "removing the previous version's pins: {e}");
        }
        (Outcome::Updated, carried)
    }

    /// Nothing new runs: keep the previous version (keepPreviousOnFailure) or remove it.
    pub(super) fn fail(
        &mut self,
        a: &ProgramAssignment,
        fallbacks: Vec<FallbackRecord>,
        cause: Option<String>,
    ) -> (ProgramStatus, Outcome) {
        let causes = match (&cause, fallbacks.is_empty()) {
            (Some(c), _) => c.clone(),
            (None, false) => fallbacks
                .iter()
                .map(|f| format!("{}: {}: {}", f.from, f.stage, f.reason))
                .collect::<Vec<_>>()
                .join("; "),
            (None, true) => "nothing was tried".to_owned(),
        };
        if let Some(run) = self.running.get(&a.name) {
            if a.fallback.keep_previous_on_failure {
                let mut status = run.status.clone();
                status.message = format!(
                    "update to generation {} failed, still running generation {} (variant {}): {causes}",
                    a.generation, run.info.generation, run.info.variant
                );
                let mut all = status.fallbacks.clone();
                all.extend(fallbacks);
                status.fallbacks = bound(all);
                return (status, Outcome::KeptPrevious);
            }
        }
        if let Some(old) = self.running.remove(&a.name) {
            drop(old.counters);
            if let Err(e) = pins::remove_program_dir(&old.info.pin_dir) {
                warn!(program = %a.name, "removing the previous version's pins: {e}");
            }
        }
        let program_dir = self.program_dir(&a.name);
        let _ = fs::remove_dir(&program_dir); // only if empty
        let message = if cause.is_some() {
            format!("not loaded: {causes}")
        } else {
            format!("no variant could run: {causes}")
        };
        let status = ProgramStatus {
            name: a.name.clone(),
            observed_generation: a.generation,
            phase: Phase::Failed,
            fallbacks: bound(fallbacks),
            message,
            ..ProgramStatus::default()
        };
        (status, Outcome::Failed)
    }
}

/// Pins the record of what runs in the version's directory (`meta`), for adoption.
fn write_record(
    a: &ProgramAssignment,
    status: &ProgramStatus,
    info: &RunningInfo,
) -> Result<(), String> {
    let record = Record {
        version: pins::META_VERSION,
        program: a.name.clone(),
        created_unix_ms: unix_ms(),
        status: status.clone(),
        info: info.clone(),
    };
    serde_json::to_vec(&record)
        .map_err(|e| e.to_string())
        .and_then(|json| pins::write_meta(&info.pin_dir, &json))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::loader::pins::{LinkRecord, NetlinkFilter};

    /// What removal reads back (the links to detach) is what `write_record` pins: a
    /// reader of another shape finds no links, and removal would leave legacy tc
    /// filters attached and bpf_links to a deferred detach.
    #[test]
    fn the_links_removal_detaches_are_read_back_from_the_written_record() {
        let links = vec![
            LinkRecord {
                program: "classify".into(),
                kind: "xdp".into(),
                target: "eth0".into(),
                mode: Some("skb".into()),
                pin: "link_classify_xdp_eth0".into(),
                link_id: 7,
                program_id: 41,
                netlink: None,
            },
            pins::netlink_record(
                "count",
                "eth0",
                "ingress",
                42,
                NetlinkFilter {
                    priority: 49152,
                    handle: 1,
                },
            ),
        ];
        let record = Record {
            version: pins::META_VERSION,
            program: "p".into(),
            created_unix_ms: unix_ms(),
            status: ProgramStatus::default(),
            info: RunningInfo {
                digest: "d".into(),
                generation: 3,
                variant: "v".into(),
                mechanism: None,
                programs: BTreeMap::new(),
                links: links.clone(),
                dispatch_keys: vec![],
                pin_dir: Default::default(),
            },
        };
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(pins::record_links(&json), Some(links));
        assert_eq!(pins::record_links(b"{\"links\": []}"), None);
    }
}
