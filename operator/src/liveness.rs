//! Which nodes' agents are alive, from their liveness Leases
//! (`kube-node-lease/bpfpoly-agent-<node>`, renewed by each agent every few seconds).
//!
//! As Kubernetes' node lifecycle controller does with kubelet Leases, the operator times a
//! Lease by when *it* saw each renewal (its own monotonic clock), not by the `renewTime` the
//! agent wrote: a node whose clock is off (a microVM's RTC) is judged correctly. A node whose
//! renewal has not been seen for `--node-lost-after` is lost: what its agent last reported no
//! longer counts as running. A node with no Lease at all is lost once the operator has run
//! that long. The Lease also names the kernel boot; a report from another boot is stale
//! (a reboot took its programs with it). The judgement itself ([`judge`]) is pure.
//!
//! While the operator cannot watch the Leases (the API server is down or unreachable), it is
//! blind, not the agents silent: the clock stops for the judgement, and the blind time is
//! added to every last renewal once the watch is back, so an outage of the control plane
//! does not mark every node lost when it ends.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bpfpoly_crds::state::{agent_lease_name, BOOT_ID_ANNOTATION};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

/// Default of `--node-lost-after`, in seconds: four renewals of the agent's default 5 s
/// interval, so one or two slow or failed renewals never mark a node lost.
pub const DEFAULT_NODE_LOST_AFTER_SECS: u64 = 20;

/// The last renewal of one node's Lease, as the operator saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `spec.renewTime` as written (only compared, never used as a clock).
    pub renew_time: Option<String>,
    /// The boot the agent runs in.
    pub boot_id: Option<String>,
    /// When the operator saw this renewal.
    pub at: Instant,
    /// The same moment on the wall clock, for messages.
    pub at_wall: Timestamp,
}

/// What the operator believes about a node's agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Agent {
    /// Renewed within the bound (or the bound is off), running in `boot_id` if known.
    Alive {
        /// The boot its Lease names.
        boot_id: Option<String>,
    },
    /// Not renewed within the bound.
    Lost {
        /// The last renewal seen (or, with no Lease ever, when the operator started).
        since: Timestamp,
        /// Why, naming the Lease and the bound.
        why: String,
    },
}

/// The pure judgement: `seen` is the node's last renewal, `started` when the operator began
/// watching Leases, `lost_after` the bound (zero: liveness is not tracked).
pub fn judge(
    node: &str,
    namespace: &str,
    seen: Option<&Seen>,
    started: (Instant, Timestamp),
    now: Instant,
    lost_after: Duration,
) -> Agent {
    if lost_after.is_zero() {
        return Agent::Alive {
            boot_id: seen.and_then(|s| s.boot_id.clone()),
        };
    }
    let lease = format!("{namespace}/{}", agent_lease_name(node));
    match seen {
        Some(s) if now.saturating_duration_since(s.at) <= lost_after => Agent::Alive {
            boot_id: s.boot_id.clone(),
        },
        Some(s) => Agent::Lost {
            since: s.at_wall,
            why: format!(
                "agent silent since {} (Lease {lease} not renewed for {} s; --node-lost-after {} s)",
                round_s(s.at_wall),
                now.saturating_duration_since(s.at).as_secs(),
                lost_after.as_secs()
            ),
        },
        None if now.saturating_duration_since(started.0) <= lost_after => Agent::Alive {
            boot_id: None,
        },
        None => Agent::Lost {
            since: started.1,
            why: format!(
                "no agent liveness: Lease {lease} not seen since the operator started at {} (--node-lost-after {} s)",
                round_s(started.1),
                lost_after.as_secs()
            ),
        },
    }
}

fn round_s(t: Timestamp) -> String {
    format!("{:.0}", t)
}

/// What is known of every agent Lease; shared by the Lease watch, the tick that notices
/// expiries, and the controller.
pub struct Liveness {
    /// The bound (`--node-lost-after`); zero turns tracking off.
    pub lost_after: Duration,
    /// Namespace of the Leases.
    pub namespace: String,
    started: Mutex<(Instant, Timestamp)>,
    /// Since when the Lease watch has been broken, if it is.
    blind_since: Mutex<Option<Instant>>,
    seen: Mutex<HashMap<String, Seen>>,
    /// Per node, the start of its last loss episode (for the NodeReturned Event).
    losses: Mutex<HashMap<String, Timestamp>>,
}

impl Liveness {
    /// Starts tracking now.
    pub fn new(lost_after: Duration, namespace: &str) -> Self {
        Self {
            lost_after,
            namespace: namespace.to_string(),
            started: Mutex::new((Instant::now(), Timestamp::now())),
            blind_since: Mutex::default(),
            seen: Mutex::default(),
            losses: Mutex::default(),
        }
    }

    /// Records a Lease as seen now. True when reconciles should look again: a node first
    /// seen, a new boot, or a renewal of a node that was lost.
    pub fn observe(&self, lease: &Lease) -> bool {
        let Some(node) = lease_node(lease) else {
            return false;
        };
        let spec = lease.spec.as_ref();
        let renew_time = spec
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string());
        let boot_id = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BOOT_ID_ANNOTATION))
            .cloned();
        let now = Instant::now();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = seen.get(&node);
        let interesting = match previous {
            None => true,
            Some(p) => {
                p.boot_id != boot_id
                    || (!self.lost_after.is_zero()
                        && now.saturating_duration_since(p.at) > self.lost_after
                        && p.renew_time != renew_time)
            }
        };
        if previous.is_some_and(|p| p.renew_time == renew_time && p.boot_id == boot_id) {
            // The same renewal again (a relist): not a sign of life.
            return false;
        }
        seen.insert(
            node,
            Seen {
                renew_time,
                boot_id,
                at: now,
                at_wall: Timestamp::now(),
            },
        );
        interesting
    }

    /// The Lease watch broke (the API server is unreachable): time stops for the judgement.
    pub fn blind(&self) {
        let mut b = self
            .blind_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.get_or_insert_with(Instant::now);
    }

    /// The Lease watch has listed again: the blind time is added to every last renewal.
    pub fn resynced(&self) {
        let Some(since) = self
            .blind_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let now = Instant::now();
        let blind = now.saturating_duration_since(since);
        for s in self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values_mut()
        {
            s.at = (s.at + blind).min(now);
        }
        let mut started = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        started.0 = (started.0 + blind).min(now);
        tracing::info!(
            blind_s = blind.as_secs(),
            "agent Lease watch back: liveness resumes"
        );
    }

    /// Forgets a deleted Lease.
    pub fn forget(&self, lease: &Lease) {
        if let Some(node) = lease_node(lease) {
            self.seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&node);
        }
    }

    /// What is believed about `node`'s agent now.
    pub fn agent(&self, node: &str) -> Agent {
        let now = self
            .blind_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(Instant::now);
        let started = *self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        judge(
            node,
            &self.namespace,
            seen.get(node),
            started,
            now,
            self.lost_after,
        )
    }

    /// The nodes among `nodes` that are lost now.
    pub fn lost<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        nodes
            .into_iter()
            .filter(|n| matches!(self.agent(n), Agent::Lost { .. }))
            .map(str::to_string)
            .collect()
    }

    /// Remembers that `node` was lost since `since`.
    pub fn record_loss(&self, node: &str, since: Timestamp) {
        self.losses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_string(), since);
    }

    /// When `node`'s last loss began, if it was ever lost.
    pub fn last_loss(&self, node: &str) -> Option<Timestamp> {
        self.losses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .copied()
    }
}

/// The node a Lease belongs to: its holder, when the name is that node's agent Lease.
fn lease_node(lease: &Lease) -> Option<String> {
    let node = lease.spec.as_ref()?.holder_identity.clone()?;
    (lease.metadata.name.as_deref() == Some(agent_lease_name(&node).as_str())).then_some(node)
}

/// Why a report is stale although its agent is alive: the agent runs in another boot than
/// the one the report comes from. `None` when the Lease names no boot (nothing to compare).
pub fn older_boot(
    node: &str,
    lease_boot: Option<&str>,
    report_boot: Option<&str>,
) -> Option<String> {
    let lease_boot = lease_boot?;
    if report_boot == Some(lease_boot) {
        return None;
    }
    Some(format!(
        "node {node} booted again (boot {lease_boot}; the report is from {}): the programs of the previous boot are gone, waiting for its agent to load and report them",
        report_boot.unwrap_or("an unnamed boot")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at: Instant, boot: &str) -> Seen {
        Seen {
            renew_time: Some("2026-12-03T12:00:00Z".into()),
            boot_id: Some(boot.into()),
            at,
            at_wall: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_renewal_within_the_bound_is_alive_and_beyond_it_lost_with_the_lease_named() {
        let t0 = Instant::now();
        let started = (t0, Timestamp::UNIX_EPOCH);
        let bound = Duration::from_secs(20);
        let s = seen(t0, "b1");
        assert_eq!(
            judge(
                "n1",
                "kube-node-lease",
                Some(&s),
                started,
                t0 + Duration::from_secs(20),
                bound
            ),
            Agent::Alive {
                boot_id: Some("b1".into())
            }
        );
        match judge(
            "n1",
            "kube-node-lease",
            Some(&s),
            started,
            t0 + Duration::from_secs(21),
            bound,
        ) {
            Agent::Lost { since, why } => {
                assert_eq!(since, Timestamp::UNIX_EPOCH);
                assert!(
                    why.contains("Lease kube-node-lease/bpfpoly-agent-n1 not renewed for 21 s"),
                    "{why}"
                );
                assert!(why.contains("--node-lost-after 20 s"), "{why}");
                assert!(why.contains("since 1970-01-01T00:00:00Z"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_lease_is_alive_only_during_the_first_bound_after_start() {
        let t0 = Instant::now();
        let started = (t0, Timestamp::UNIX_EPOCH);
        let bound = Duration::from_secs(20);
        assert!(matches!(
            judge(
                "n1",
                "ns",
                None,
                started,
                t0 + Duration::from_secs(5),
                bound
            ),
            Agent::Alive { boot_id: None }
        ));
        match judge(
            "n1",
            "ns",
            None,
            started,
            t0 + Duration::from_secs(25),
            bound,
        ) {
            Agent::Lost { why, .. } => assert!(
                why.contains("Lease ns/bpfpoly-agent-n1 not seen since the operator started"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_zero_bound_turns_tracking_off() {
        let t0 = Instant::now();
        assert!(matches!(
            judge(
                "n1",
                "ns",
                None,
                (t0, Timestamp::UNIX_EPOCH),
                t0 + Duration::from_secs(3600),
                Duration::ZERO
            ),
            Agent::Alive { .. }
        ));
    }

    #[test]
    fn a_report_from_another_boot_is_stale() {
        assert_eq!(older_boot("n", None, Some("a")), None);
        assert_eq!(older_boot("n", Some("a"), Some("a")), None);
        let why = older_boot("n", Some("b"), Some("a")).unwrap();
        assert!(
            why.contains("booted again (boot b; the report is from a)"),
            "{why}"
        );
        assert!(older_boot("n", Some("b"), None).is_some());
    }

    fn lease(node: &str, renew: &str, boot: &str) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": agent_lease_name(node), "annotations": {BOOT_ID_ANNOTATION: boot}},
            "spec": {"holderIdentity": node, "renewTime": renew}
        }))
        .unwrap()
    }

    #[test]
    fn observe_counts_renewals_not_relists_and_flags_new_nodes_and_boots() {
        let l = Liveness::new(Duration::from_secs(20), "ns");
        assert!(
            l.observe(&lease("n", "2026-12-03T12:00:00.000000Z", "b1")),
            "first seen"
        );
        assert!(
            !l.observe(&lease("n", "2026-12-03T12:00:05.000000Z", "b1")),
            "a renewal"
        );
        assert!(
            !l.observe(&lease("n", "2026-12-03T12:00:05.000000Z", "b1")),
            "the same again"
        );
        assert!(
            l.observe(&lease("n", "2026-12-03T12:01:00.000000Z", "b2")),
            "a new boot"
        );
        assert_eq!(
            l.agent("n"),
            Agent::Alive {
                boot_id: Some("b2".into())
            }
        );
        // A Lease whose name is not the holder's agent Lease is not believed.
        let mut other = lease("n", "2026-12-03T12:02:00.000000Z", "b3");
        other.metadata.name = Some("someone-else".into());
        assert!(!l.observe(&other));
        assert_eq!(
            l.agent("n"),
            Agent::Alive {
                boot_id: Some("b2".into())
            }
        );
    }
}
