//! The agent's liveness signal: a `coordination.k8s.io/v1` Lease per node,
//! `kube-node-lease/bpfpoly-agent-<node>`, renewed every `--lease-renew-interval` for as
//! long as the agent runs, whatever its main loop is doing. The operator stops counting a
//! node whose Lease it has not seen renewed within its `--node-lost-after`. The Lease names
//! the kernel boot (annotation `bpfpoly.io/boot-id`): after a reboot the programs of the
//! older boot are gone, and a report from that boot is no longer believed.

use std::time::Duration;

use bpfpoly_crds::state::{
    agent_field_manager, agent_lease_name, AGENT_LEASE_LABEL, BOOT_ID_ANNOTATION,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

/// Where the kernel publishes the id of the running boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The running kernel's boot id, or `None` when it cannot be read.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The Lease as the agent applies it on every renewal.
fn lease_object(
    node: &str,
    boot: Option<&str>,
    renew: Duration,
    acquired: &str,
    now: &str,
) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if let Some(b) = boot {
        annotations.insert(BOOT_ID_ANNOTATION.into(), b.into());
    }
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": agent_lease_name(node),
            "labels": {AGENT_LEASE_LABEL: "true"},
            "annotations": annotations,
        },
        "spec": {
            "holderIdentity": node,
            // What the agent promises: a renewal well within this. The operator judges with
            // its own --node-lost-after, from when it sees each renewal (no clock skew).
            "leaseDurationSeconds": (renew.as_secs() * 4).max(4),
            "acquireTime": acquired,
            "renewTime": now,
        }
    })
}

/// RFC 3339 with microseconds, as `MicroTime` is written.
fn micro_now() -> String {
    format!("{:.6}", k8s_openapi::jiff::Timestamp::now())
}

/// Renews the Lease every `renew` until the process exits. A failed renewal is logged and
/// retried at the next tick (an API server outage must not stop the agent).
pub async fn renew_forever(client: Client, namespace: String, node: String, renew: Duration) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let boot = boot_id();
    if boot.is_none() {
        tracing::warn!(
            path = BOOT_ID_PATH,
            "cannot read the boot id: the Lease names no boot"
        );
    }
    let name = agent_lease_name(&node);
    let pp = PatchParams::apply(&agent_field_manager(&node)).force();
    let acquired = micro_now();
    let mut tick = tokio::time::interval(renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let obj = lease_object(&node, boot.as_deref(), renew, &acquired, &micro_now());
        match api.patch(&name, &pp, &Patch::Apply(&obj)).await {
            Ok(_) => {
                if failing {
                    tracing::info!(lease = %format!("{namespace}/{name}"), "liveness Lease renewed again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(lease = %format!("{namespace}/{name}"), error = %e, "cannot renew the liveness Lease; retrying every tick");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_names_node_boot_and_a_duration_beyond_the_renewal() {
        let o = lease_object(
            "debian-6-1",
            Some("b-1"),
            Duration::from_secs(5),
            "2026-12-03T12:00:00.000000Z",
            "2026-12-03T12:00:05.000000Z",
        );
        assert_eq!(o["metadata"]["name"], "bpfpoly-agent-debian-6-1");
        assert_eq!(o["metadata"]["labels"][AGENT_LEASE_LABEL], "true");
        assert_eq!(o["metadata"]["annotations"][BOOT_ID_ANNOTATION], "b-1");
        assert_eq!(o["spec"]["holderIdentity"], "debian-6-1");
        assert_eq!(o["spec"]["leaseDurationSeconds"], 20);
        assert_eq!(o["spec"]["renewTime"], "2026-12-03T12:00:05.000000Z");
        // It parses as the API type (MicroTime fields included).
        let lease: Lease = serde_json::from_value(o).unwrap();
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some("debian-6-1")
        );
    }

    #[test]
    fn the_running_kernel_has_a_boot_id() {
        let b = boot_id().expect("/proc/sys/kernel/random/boot_id");
        assert_eq!(b.len(), 36, "{b}");
    }

    #[test]
    fn micro_time_has_microseconds() {
        let t = micro_now();
        assert!(t.ends_with('Z') && t.contains('.'), "{t}");
        assert_eq!(t.rsplit('.').next().unwrap().len(), 7, "{t}");
    }
}
