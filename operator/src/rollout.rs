//! Rollout waves, decided from what the cluster already shows (no hidden state), so an
//! operator that restarts mid-rollout continues where the previous one stopped.
//!
//! Order: the first `canary` eligible nodes (by name) go first; once every canary has
//! reported Loaded or Degraded for the current generation, the rest proceed with at most
//! `maxUnavailable` nodes in flight. When more than `pauseOnDegradedRatio` of the updated
//! nodes that reported are Degraded or Failed, no further node is updated until the spec
//! changes (a new generation starts a new rollout).

use std::collections::BTreeSet;

use bpfpoly_crds::program::Rollout;
use bpfpoly_crds::state::Phase;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// What the cluster shows about one eligible node for one program.
#[derive(Clone, Debug)]
pub struct NodeProgress<'a> {
    /// Node name.
    pub node: &'a str,
    /// Generation currently assigned in the node's state spec, if any.
    pub assigned: Option<i64>,
    /// What the agent reported: (observed generation, phase).
    pub reported: Option<(i64, Phase)>,
}

/// The outcome of planning.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// Nodes that should carry the current generation now.
    pub updated: BTreeSet<String>,
    /// True when the degraded share stopped the rollout.
    pub paused: bool,
    /// Why the rollout is where it is.
    pub message: String,
}

/// Nodes allowed in flight at once.
pub fn max_unavailable(r: &Rollout, eligible: usize) -> usize {
    let n = match &r.max_unavailable {
        IntOrString::Int(n) => usize::try_from(*n).unwrap_or(1),
        IntOrString::String(s) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap_or(25);
            (eligible * pct).div_ceil(100)
        }
    };
    n.max(1)
}

fn settled(p: &NodeProgress<'_>, generation: i64) -> Option<Phase> {
    match p.reported {
        Some((g, phase))
            if g == generation
                && matches!(phase, Phase::Loaded | Phase::Degraded | Phase::Failed) =>
        {
            Some(phase)
        }
        _ => None,
    }
}

/// Plans which eligible nodes carry `generation`. `nodes` must be sorted by name.
pub fn plan(generation: i64, rollout: &Rollout, nodes: &[NodeProgress<'_>]) -> Plan {
    let mut updated: BTreeSet<String> = nodes
        .iter()
        .filter(|n| n.assigned == Some(generation))
        .map(|n| n.node.to_string())
        .collect();
    let reported: Vec<Phase> = nodes
        .iter()
        .filter(|n| updated.contains(n.node))
        .filter_map(|n| settled(n, generation))
        .collect();
    let bad = reported
        .iter()
        .filter(|p| matches!(p, Phase::Degraded | Phase::Failed))
        .count();
    if !reported.is_empty() && bad as f64 / reported.len() as f64 > rollout.pause_on_degraded_ratio
    {
        return Plan {
            paused: true,
            message: format!(
                "paused: {bad} of {} updated nodes degraded or failed (threshold {}); change the spec to resume",
                reported.len(),
                rollout.pause_on_degraded_ratio
            ),
            updated,
        };
    }

    let canaries = (rollout.canary as usize).min(nodes.len());
    for n in &nodes[..canaries] {
        updated.insert(n.node.to_string());
    }
    let waiting: Vec<&str> = nodes[..canaries]
        .iter()
        .filter(|n| {
            !matches!(
                settled(n, generation),
                Some(Phase::Loaded | Phase::Degraded)
            )
        })
        .map(|n| n.node)
        .collect();
    if !waiting.is_empty() {
        return Plan {
            message: format!("waiting for canary node(s) {}", waiting.join(", ")),
            updated,
            paused: false,
        };
    }

    let limit = max_unavailable(rollout, nodes.len());
    let in_flight = nodes
        .iter()
        .filter(|n| updated.contains(n.node) && settled(n, generation).is_none())
        .count();
    let mut room = limit.saturating_sub(in_flight);
    for n in nodes {
        if room == 0 {
            break;
        }
        if updated.insert(n.node.to_string()) {
            room -= 1;
        }
    }
    let message = if updated.len() == nodes.len() {
        format!("all {} eligible nodes updated", nodes.len())
    } else {
        format!(
            "{} of {} eligible nodes updated; at most {limit} in flight",
            updated.len(),
            nodes.len()
        )
    };
    Plan {
        updated,
        paused: false,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(max: IntOrString, canary: u32, ratio: f64) -> Rollout {
        Rollout {
            max_unavailable: max,
            canary,
            pause_on_degraded_ratio: ratio,
        }
    }

    const NAMES: [&str; 10] = [
        "n00", "n01", "n02", "n03", "n04", "n05", "n06", "n07", "n08", "n09",
    ];

    /// `n` nodes (at most 10) with nothing assigned and nothing reported yet.
    fn fresh(n: usize) -> Vec<NodeProgress<'static>> {
        NAMES[..n]
            .iter()
            .map(|n| NodeProgress {
                node: n,
                assigned: None,
                reported: None,
            })
            .collect()
    }

    /// Generation 1 assigned to `n`, and its agent reporting `phase` for it.
    fn report(n: &mut NodeProgress<'_>, phase: Phase) {
        n.assigned = Some(1);
        n.reported = Some((1, phase));
    }

    #[test]
    fn canary_goes_first_and_alone() {
        let nodes = fresh(10);
        let p = plan(1, &rollout(IntOrString::Int(3), 1, 0.5), &nodes);
        assert_eq!(p.updated, BTreeSet::from(["n00".to_string()]));
        assert!(p.message.contains("canary"));
    }

    #[test]
    fn batches_follow_once_the_canary_settles() {
        let mut nodes = fresh(10);
        report(&mut nodes[0], Phase::Loaded);
        let r = rollout(IntOrString::String("30%".into()), 1, 0.5);
        let p = plan(1, &r, &nodes);
        // 30% of 10 = 3 in flight, after the settled canary.
        assert_eq!(p.updated.len(), 4);
        // Those three still loading: nothing new.
        for n in nodes.iter_mut().take(4).skip(1) {
            n.assigned = Some(1);
        }
        assert_eq!(plan(1, &r, &nodes).updated.len(), 4);
        // One settles: one more goes.
        nodes[1].reported = Some((1, Phase::Loaded));
        assert_eq!(plan(1, &r, &nodes).updated.len(), 5);
    }

    #[test]
    fn degraded_share_pauses_and_a_new_generation_resumes() {
        let mut nodes = fresh(6);
        for n in nodes.iter_mut().take(2) {
            report(n, Phase::Degraded);
        }
        let r = rollout(IntOrString::Int(2), 1, 0.5);
        let p = plan(1, &r, &nodes);
        assert!(p.paused);
        assert_eq!(p.updated.len(), 2, "no node beyond the updated ones");
        let p2 = plan(2, &r, &nodes);
        assert!(!p2.paused);
        assert_eq!(p2.updated, BTreeSet::from(["n00".to_string()]));
    }

    #[test]
    fn zero_canaries_start_with_a_full_batch() {
        let nodes = fresh(8);
        let p = plan(
            1,
            &rollout(IntOrString::String("100%".into()), 0, 0.5),
            &nodes,
        );
        assert_eq!(p.updated.len(), 8);
        assert!(p.message.starts_with("all 8"));
    }

    #[test]
    fn a_failed_canary_holds_the_rollout() {
        let mut nodes = fresh(4);
        report(&mut nodes[0], Phase::Failed);
        let p = plan(1, &rollout(IntOrString::Int(1), 1, 1.0), &nodes);
        assert_eq!(p.updated.len(), 1);
        assert!(p.message.contains("n00"));
    }
}
