//! What the node state names, resolved against the programs this agent has read.
//!
//! A node state carries, per program, only what differs per node: the generation, the
//! eligible variants' names in order and the config globals that fell back. The variant
//! definitions, the dispatch table and the fallback policy come from the `BpfPolyProgram`
//! at that generation. An agent never loads a generation whose program it has not read:
//! until it has, the program waits (what runs keeps running) and is reported Pending.

use std::collections::{BTreeSet, HashMap};

use bpfpoly_crds::state::{self, AssignedProgram, Phase, ProgramAssignment, ProgramStatus};
use bpfpoly_crds::BpfPolyProgram;
use kube::runtime::reflector::{ObjectRef, Store};

/// Resolutions by program and generation, kept while the node state names them, so that a
/// node the rollout has not reached yet keeps its generation after the program moved on.
#[derive(Default)]
pub(super) struct Resolved {
    by_generation: HashMap<(String, i64), ProgramAssignment>,
    /// Programs that could not be resolved in the last pass (a change of one of them is
    /// worth another pass).
    pub(super) waiting: BTreeSet<String>,
}

/// One node-state entry: resolved, or why it waits.
pub(super) enum Entry {
    Ready(ProgramAssignment),
    Waiting(ProgramStatus),
}

impl Resolved {
    /// Each entry of the node state resolved against `programs`; resolutions the state no
    /// longer names are forgotten.
    pub(super) fn pass(
        &mut self,
        wanted: &[std::sync::Arc<AssignedProgram>],
        programs: &Store<BpfPolyProgram>,
    ) -> Vec<Entry> {
        let named: BTreeSet<(String, i64)> = wanted
            .iter()
            .map(|a| (a.name.clone(), a.generation))
            .collect();
        self.by_generation.retain(|k, _| named.contains(k));
        self.waiting.clear();
        wanted
            .iter()
            .map(|a| match self.resolve(a, programs) {
                Ok(r) => Entry::Ready(r),
                Err(why) => {
                    self.waiting.insert(a.name.clone());
                    Entry::Waiting(waiting_status(a, why))
                }
            })
            .collect()
    }

    fn resolve(
        &mut self,
        a: &AssignedProgram,
        programs: &Store<BpfPolyProgram>,
    ) -> Result<ProgramAssignment, String> {
        let key = (a.name.clone(), a.generation);
        if let Some(r) = self.by_generation.get(&key) {
            return Ok(r.clone());
        }
        let p = programs.get(&ObjectRef::new(&a.name)).ok_or_else(|| {
            format!(
                "waiting to read BpfPolyProgram {:?} (generation {}): not found yet",
                a.name, a.generation
            )
        })?;
        let generation = p.metadata.generation.unwrap_or(0);
        let r = state::resolve(a, &p.spec, generation).map_err(|e| match e {
            state::ResolveError::Generation { .. } => format!("waiting: {e}"),
            other => other.to_string(),
        })?;
        self.by_generation.insert(key, r.clone());
        Ok(r)
    }
}

/// The status of an entry that waits: Pending at its generation, with why. Whatever ran
/// before keeps running.
fn waiting_status(a: &AssignedProgram, why: String) -> ProgramStatus {
    ProgramStatus {
        name: a.name.clone(),
        observed_generation: a.generation,
        phase: Phase::Pending,
        message: why,
        ..ProgramStatus::default()
    }
}
