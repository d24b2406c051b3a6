//! Status aggregation: from per-node outcomes to the program's status and conditions. Pure.

use std::collections::BTreeMap;

use bpfpoly_crds::program::{
    NodeCounts, NodeSample, OnNoEligibleVariant, RolloutStatus, VariantCount,
};
use bpfpoly_crds::state::{Phase, ProgramStatus};
use bpfpoly_crds::BpfPolyProgramStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::rollout::Plan;

/// Largest number of node samples kept in status.
pub const MAX_SAMPLES: usize = 20;
/// Largest number of node names quoted in a condition message.
const MAX_NAMED: usize = 5;

/// What one selected node amounts to for one program.
#[derive(Clone, Debug)]
pub enum NodeOutcome<'a> {
    /// The node's facts are not all known yet.
    Pending(String),
    /// No variant can run there.
    Unsupported(String),
    /// Eligible; with what the agent reported, if anything.
    Eligible(Option<&'a ProgramStatus>),
    /// Eligible, but what was reported for it is not believed (see [`crate::trust`]).
    Ignored(String),
    /// Eligible, but its agent is lost (see [`crate::liveness`]): what it last reported is
    /// not counted as running.
    Lost(String),
}

/// Inputs of one aggregation.
pub struct Inputs<'a> {
    /// Program generation.
    pub generation: i64,
    /// Outcome per selected node, by node name.
    pub nodes: &'a BTreeMap<String, NodeOutcome<'a>>,
    /// The rollout plan.
    pub plan: &'a Plan,
    /// Policy for nodes without an eligible variant.
    pub on_no_eligible: OnNoEligibleVariant,
    /// Existing conditions, to keep transition times.
    pub previous: &'a [Condition],
    /// Now, for new transitions.
    pub now: Time,
}

fn named(nodes: &[(String, String)]) -> String {
    let mut parts: Vec<String> = nodes
        .iter()
        .take(MAX_NAMED)
        .map(|(n, why)| format!("{n} ({why})"))
        .collect();
    if nodes.len() > MAX_NAMED {
        parts.push(format!("and {} more", nodes.len() - MAX_NAMED));
    }
    parts.join("; ")
}

/// Why a node degraded or failed, from its reported status.
fn reported_reason(s: &ProgramStatus) -> String {
    if let Some(f) = s.fallbacks.last() {
        format!("{} -> {} at {}: {}", f.from, f.to, f.stage, f.reason)
    } else if !s.message.is_empty() {
        s.message.clone()
    } else {
        format!("{:?}", s.phase)
    }
}

/// The program's status: node counts, conditions, variants and samples.
pub fn aggregate(i: &Inputs<'_>) -> BpfPolyProgramStatus {
    let t = Tally::of(i);
    let (variants, variant_summary) = variant_counts(&t.variants);
    BpfPolyProgramStatus {
        observed_generation: Some(i.generation),
        conditions: conditions(i, &t),
        samples: t.samples(),
        nodes: t.counts,
        variants,
        variant_summary,
        rollout: RolloutStatus {
            updated_nodes: i.plan.updated.len() as u32,
            paused: i.plan.paused,
            message: i.plan.message.clone(),
        },
        warnings: Vec::new(),
    }
}

/// The nodes sorted by what they are, each with why (node, reason).
struct Tally {
    counts: NodeCounts,
    /// Nodes running each variant.
    variants: BTreeMap<String, u32>,
    degraded: Vec<(String, String)>,
    failed: Vec<(String, String)>,
    unsupported: Vec<(String, String)>,
    pending: Vec<(String, String)>,
    lost: Vec<(String, String)>,
}

impl Tally {
    fn of(i: &Inputs<'_>) -> Tally {
        let mut counts = NodeCounts {
            selected: i.nodes.len() as u32,
            ..NodeCounts::default()
        };
        let mut variants: BTreeMap<String, u32> = BTreeMap::new();
        let mut degraded = Vec::new();
        let mut failed = Vec::new();
        let mut unsupported = Vec::new();
        let mut pending = Vec::new();
        let mut lost = Vec::new();
        for (node, outcome) in i.nodes {
            match outcome {
                NodeOutcome::Pending(why) => pending.push((node.clone(), why.clone())),
                NodeOutcome::Unsupported(why) => unsupported.push((node.clone(), why.clone())),
                NodeOutcome::Ignored(why) => {
                    counts.eligible += 1;
                    pending.push((node.clone(), why.clone()));
                }
                NodeOutcome::Lost(why) => {
                    counts.eligible += 1;
                    lost.push((node.clone(), why.clone()));
                }
                NodeOutcome::Eligible(reported) => {
                    counts.eligible += 1;
                    let current = reported.filter(|s| s.observed_generation == i.generation);
                    match reported.map(|s| s.phase) {
                        Some(Phase::Loaded | Phase::Degraded) => {
                            let s = reported.expect("matched Some");
                            if let Some(v) = &s.variant {
                                *variants.entry(v.clone()).or_default() += 1;
                            }
                            if s.phase == Phase::Loaded {
                                counts.loaded += 1;
                            } else {
                                counts.degraded += 1;
                                degraded.push((node.clone(), reported_reason(s)));
                            }
                            if current.is_none() {
                                pending.push((node.clone(), "running an older generation".into()));
                            }
                        }
                        Some(Phase::Failed) => {
                            counts.failed += 1;
                            failed.push((
                                node.clone(),
                                reported_reason(reported.expect("matched Some")),
                            ));
                        }
                        _ => pending.push((node.clone(), "waiting for the agent".into())),
                    }
                }
            }
        }
        counts.unsupported = unsupported.len() as u32;
        counts.lost = lost.len() as u32;
        if i.on_no_eligible == OnNoEligibleVariant::Fail {
            counts.failed += counts.unsupported;
        }
        counts.pending = pending
            .iter()
            .filter(|(_, why)| why != "running an older generation")
            .count() as u32;
        Tally {
            counts,
            variants,
            degraded,
            failed,
            unsupported,
            pending,
            lost,
        }
    }

    /// At most `MAX_SAMPLES` nodes, the worst first.
    fn samples(&self) -> Vec<NodeSample> {
        let mut samples = Vec::new();
        for (phase, list) in [
            ("Failed", &self.failed),
            ("Lost", &self.lost),
            ("Unsupported", &self.unsupported),
            ("Degraded", &self.degraded),
            ("Pending", &self.pending),
        ] {
            for (node, reason) in list.iter() {
                if samples.len() < MAX_SAMPLES {
                    samples.push(NodeSample {
                        node: node.clone(),
                        phase: phase.into(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        samples
    }
}

/// Ready's reason and message, the first that applies: paused, failed, lost, pending, no
/// node selected, no eligible node, running.
fn ready_reason(i: &Inputs<'_>, t: &Tally) -> (&'static str, String) {
    let Tally {
        counts,
        failed,
        lost,
        pending,
        unsupported,
        ..
    } = t;
    if i.plan.paused {
        ("RolloutPaused", i.plan.message.clone())
    } else if !failed.is_empty() {
        ("NodesFailed", format!("failed on {}", named(failed)))
    } else if !lost.is_empty() {
        (
            "NodesLost",
            format!("not known to run on lost node(s) {}", named(lost)),
        )
    } else if !pending.is_empty() {
        ("Progressing", format!("waiting for {}", named(pending)))
    } else if counts.selected == 0 {
        // A selector that matches nothing is usually a typo: not Ready, and said plainly.
        (
            "NoNodesSelected",
            "spec.nodeSelector matches no node".into(),
        )
    } else if counts.eligible == 0 {
        (
            "NoEligibleNode",
            format!("no selected node can run it: {}", named(unsupported)),
        )
    } else {
        (
            "Running",
            format!(
                "running on {} of {} selected nodes ({} degraded, {} unsupported)",
                counts.loaded + counts.degraded,
                counts.selected,
                counts.degraded,
                counts.unsupported
            ),
        )
    }
}

/// Ready, Progressing, Degraded and Unsupported.
fn conditions(i: &Inputs<'_>, t: &Tally) -> Vec<Condition> {
    let Tally {
        counts,
        degraded,
        failed,
        unsupported,
        pending,
        lost,
        ..
    } = t;
    let all_current = pending.is_empty() && failed.is_empty() && lost.is_empty();
    let mut conditions = Vec::new();
    let mut cond = |type_: &str, status: bool, reason: &str, message: String| {
        conditions.push(condition(i, type_, status, reason, message));
    };
    let (reason, message) = ready_reason(i, t);
    let ready = all_current && !i.plan.paused && counts.eligible > 0;
    cond("Ready", ready, reason, message);
    cond(
        "Progressing",
        !pending.is_empty() && !i.plan.paused,
        if i.plan.paused {
            "RolloutPaused"
        } else if pending.is_empty() {
            "Complete"
        } else {
            "Rolling"
        },
        i.plan.message.clone(),
    );
    cond(
        "Degraded",
        !degraded.is_empty() || !failed.is_empty(),
        if !failed.is_empty() {
            "NodesFailed"
        } else if degraded.is_empty() {
            "NoFallbacks"
        } else {
            "FellBack"
        },
        if degraded.is_empty() && failed.is_empty() {
            "no node fell back".into()
        } else {
            named(&[failed.clone(), degraded.clone()].concat())
        },
    );
    cond(
        "Unsupported",
        !unsupported.is_empty(),
        if unsupported.is_empty() {
            "AllEligible"
        } else {
            "NoEligibleVariant"
        },
        if unsupported.is_empty() {
            "every decided node has an eligible variant".into()
        } else {
            named(unsupported)
        },
    );
    conditions
}

/// Nodes per variant, and the `name=count,...` summary (none when nothing runs).
fn variant_counts(variants: &BTreeMap<String, u32>) -> (Vec<VariantCount>, Option<String>) {
    let list: Vec<VariantCount> = variants
        .iter()
        .map(|(name, nodes)| VariantCount {
            name: name.clone(),
            nodes: *nodes,
        })
        .collect();
    let summary = list
        .iter()
        .map(|v| format!("{}={}", v.name, v.nodes))
        .collect::<Vec<_>>()
        .join(",");
    (list, (!summary.is_empty()).then_some(summary))
}

fn condition(
    i: &Inputs<'_>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last = i
        .previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| i.now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: Some(i.generation),
        last_transition_time: last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpfpoly_crds::state::{FallbackRecord, FallbackStage};

    fn status(phase: Phase, variant: &str, gen: i64) -> ProgramStatus {
        ProgramStatus {
            name: "p".into(),
            observed_generation: gen,
            phase,
            variant: Some(variant.into()),
            ..ProgramStatus::default()
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    /// `aggregate` of a generation with no previous status.
    fn summarize(
        generation: i64,
        nodes: &BTreeMap<String, NodeOutcome<'_>>,
        plan: &Plan,
        on_no_eligible: OnNoEligibleVariant,
    ) -> BpfPolyProgramStatus {
        aggregate(&Inputs {
            generation,
            nodes,
            plan,
            on_no_eligible,
            previous: &[],
            now: now(),
        })
    }

    #[test]
    fn counts_conditions_and_samples_name_nodes_and_causes() {
        let mut degraded = status(Phase::Degraded, "tp-btf", 2);
        degraded.fallbacks.push(FallbackRecord {
            from: "kprobe".into(),
            to: "tp-btf".into(),
            stage: FallbackStage::Attach,
            reason: "kprobes are not supported".into(),
            verifier_log: None,
        });
        let loaded = status(Phase::Loaded, "tp-btf", 2);
        let mut nodes = BTreeMap::new();
        nodes.insert("a".to_string(), NodeOutcome::Eligible(Some(&loaded)));
        nodes.insert("b".to_string(), NodeOutcome::Eligible(Some(&degraded)));
        nodes.insert(
            "c".to_string(),
            NodeOutcome::Unsupported(
                "variant tp-btf: field struct task_struct.loginuid missing on this kernel".into(),
            ),
        );
        let plan = Plan {
            updated: ["a", "b"].map(String::from).into(),
            paused: false,
            message: "all 2 eligible nodes updated".into(),
        };
        let s = summarize(2, &nodes, &plan, OnNoEligibleVariant::Skip);
        assert_eq!(
            s.nodes,
            NodeCounts {
                selected: 3,
                eligible: 2,
                loaded: 1,
                degraded: 1,
                failed: 0,
                unsupported: 1,
                pending: 0,
                lost: 0,
            }
        );
        assert_eq!(s.variant_summary.as_deref(), Some("tp-btf=2"));
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!(get("Ready").status, "True");
        assert_eq!(get("Degraded").status, "True");
        assert!(get("Degraded")
            .message
            .contains("b (kprobe -> tp-btf at attach: kprobes are not supported)"));
        assert_eq!(get("Unsupported").status, "True");
        assert!(get("Unsupported")
            .message
            .contains("c (variant tp-btf: field struct task_struct.loginuid missing"));
        assert_eq!(s.samples.len(), 2);
    }

    #[test]
    fn pending_and_old_generations_keep_ready_false() {
        let old = status(Phase::Loaded, "v1", 1);
        let mut nodes = BTreeMap::new();
        nodes.insert("a".to_string(), NodeOutcome::Eligible(Some(&old)));
        nodes.insert("b".to_string(), NodeOutcome::Pending("node profile".into()));
        let plan = Plan::default();
        let s = summarize(2, &nodes, &plan, OnNoEligibleVariant::Fail);
        assert_eq!(s.nodes.pending, 1);
        assert_eq!(s.nodes.loaded, 1);
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert!(ready.message.contains("a (running an older generation)"));
        assert!(ready.message.contains("b (node profile)"));
    }

    #[test]
    fn a_lost_node_is_not_counted_as_loaded_and_is_named_with_why() {
        let loaded = status(Phase::Loaded, "v1", 1);
        let mut nodes = BTreeMap::new();
        nodes.insert("a".to_string(), NodeOutcome::Eligible(Some(&loaded)));
        nodes.insert(
            "b".to_string(),
            NodeOutcome::Lost("agent silent since 2026-12-03T12:00:00Z".into()),
        );
        let plan = Plan::default();
        let s = summarize(1, &nodes, &plan, OnNoEligibleVariant::Skip);
        assert_eq!(
            (
                s.nodes.eligible,
                s.nodes.loaded,
                s.nodes.lost,
                s.nodes.pending
            ),
            (2, 1, 1, 0)
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NodesLost")
        );
        assert!(
            ready
                .message
                .contains("b (agent silent since 2026-12-03T12:00:00Z)"),
            "{}",
            ready.message
        );
        assert_eq!(s.samples[0].node, "b");
        assert_eq!(s.samples[0].phase, "Lost");
        assert_eq!(s.variant_summary.as_deref(), Some("v1=1"));
    }

    #[test]
    fn a_selector_matching_no_node_is_not_ready_and_says_so() {
        let nodes = BTreeMap::new();
        let plan = Plan::default();
        let s = summarize(1, &nodes, &plan, OnNoEligibleVariant::Skip);
        assert_eq!(s.nodes.selected, 0);
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "NoNodesSelected");
        assert_eq!(ready.message, "spec.nodeSelector matches no node");
    }
}
