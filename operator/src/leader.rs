//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! One replica holds the Lease and reconciles; the others stand by. Two things matter when the
//! operator runs as a Deployment's Pods, and both are done here:
//! - the leader **hands the Lease back** when it is stopped (SIGTERM: `kubectl delete pod`, a
//!   rolling update, a drain), so nobody waits for its term to run out;
//! - a standby **polls** the Lease (about once a second) instead of sleeping until the
//!   holder's term would end, so a released Lease is taken within about a second.
//!
//! Every write is a `replace` carrying the `resourceVersion` that was read, so of two replicas
//! racing for a free Lease exactly one wins (the other gets 409 Conflict and stays a standby).
//! The decision itself ([`decide`]) is pure.
//!
//! While the API server cannot be reached, nobody can take the Lease over, so a leader that
//! cannot renew keeps leading; it steps down (exits) only once it reads that someone else
//! holds the Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};

/// What to do with the Lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew it.
    Renew,
    /// It is free (no holder) or its holder's term has run out: take it.
    Take,
    /// Someone else holds it for `remaining` more.
    Wait {
        /// The holder's identity.
        holder: String,
        /// How long its term still runs.
        remaining: Duration,
    },
}

/// What the Lease says to `identity` at `now`. A Lease without a holder (a fresh one, or one
/// its leader released), or whose renew time or duration is missing, is free.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    let holder = match spec.holder_identity.as_deref() {
        Some(h) if !h.is_empty() => h,
        _ => return Decision::Take,
    };
    if holder == identity {
        return Decision::Renew;
    }
    let (Some(renew), Some(secs)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds) else {
        return Decision::Take;
    };
    let ends = renew
        .0
        .checked_add(SignedDuration::from_secs(i64::from(secs.max(0))))
        .unwrap_or(renew.0);
    match Duration::try_from(ends.duration_since(now)) {
        Ok(remaining) if !remaining.is_zero() => Decision::Wait {
            holder: holder.to_string(),
            remaining,
        },
        _ => Decision::Take,
    }
}

/// The result of one [`Elector::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (just taken, or renewed).
    Holding,
    /// Someone else holds it (or won the race for it just now).
    Standby {
        /// Who, as far as we read it ("" when we lost a race and have not read it since).
        holder: String,
    },
}

/// One replica's side of the election.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    /// An elector for the Lease `namespace/name`, as `identity`, with terms of `duration`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often the leader renews: a third of the term.
    pub fn renew_interval(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(500))
    }

    /// How often a standby reads the Lease: a fortieth of the term, between 0.1 and 0.25 s.
    /// A Lease released on SIGTERM is then taken by the standby before the Deployment's
    /// replacement Pod has started (it starts in about a second; at a 1 s poll it sometimes
    /// won). One small GET per poll, from one standby.
    pub fn poll_interval(&self) -> Duration {
        (self.duration / 40).clamp(Duration::from_millis(100), Duration::from_millis(250))
    }

    fn secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Reads the Lease once and renews or takes it when [`decide`] says so. A Lease that does
    /// not exist is created, held by us.
    pub async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_duration_seconds: Some(self.secs()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Holding),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Standby {
                    holder: String::new(),
                }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        match decide(Some(spec), &self.identity, now) {
            Decision::Wait { holder, .. } => return Ok(Attempt::Standby { holder }),
            Decision::Renew => {
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.secs());
            }
            Decision::Take => {
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.secs());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        // resourceVersion is the one read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Holding),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Standby {
                holder: String::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Hands the Lease back if we hold it: no holder, no renew time, so the next standby that
    /// reads it takes it at once. Returns whether there was anything to release.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held(holder: Option<&str>, renewed: Option<i64>, secs: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: secs,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_without_a_holder_is_taken() {
        assert_eq!(decide(None, "a", at(0)), Decision::Take);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", at(0)),
            Decision::Take
        );
        // What release() leaves behind.
        assert_eq!(
            decide(Some(&held(None, None, Some(15))), "a", at(0)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&held(Some(""), Some(0), Some(15))), "a", at(1)),
            Decision::Take
        );
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_it_ran_out() {
        let s = held(Some("a"), Some(0), Some(15));
        assert_eq!(decide(Some(&s), "a", at(1)), Decision::Renew);
        assert_eq!(decide(Some(&s), "a", at(100)), Decision::Renew);
    }

    #[test]
    fn another_holders_lease_is_waited_for_until_its_term_ends() {
        let s = held(Some("b"), Some(0), Some(15));
        assert_eq!(
            decide(Some(&s), "a", at(5)),
            Decision::Wait {
                holder: "b".into(),
                remaining: Duration::from_secs(10)
            }
        );
        assert_eq!(decide(Some(&s), "a", at(15)), Decision::Take);
        assert_eq!(decide(Some(&s), "a", at(16)), Decision::Take);
    }

    #[test]
    fn a_held_lease_without_renew_time_or_duration_is_free() {
        assert_eq!(
            decide(Some(&held(Some("b"), None, Some(15))), "a", at(0)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&held(Some("b"), Some(0), None)), "a", at(0)),
            Decision::Take
        );
    }
}
