//! The operator's lifecycle against the real kube-apiserver, with **simulated nodes** (Node
//! objects and agent status written by the test; no kernel): deletion waits for the agents
//! to unload (or times out into an Event), deleted nodes are cleaned up, and a standby takes
//! the lease within its duration, or at once from a leader stopped with SIGTERM. Run by
//! `make api-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

#[path = "../../test-support/operator_fixtures.rs"]
mod fixtures;
use fixtures::*;

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn delete_waits_for_unload_and_deleted_nodes_are_cleaned_up() {
    let c = client().await;
    let test = "fin";
    let nodes: Vec<String> = (0..2).map(|i| format!("sim-fin-{i}")).collect();
    cleanup(&c, test, &nodes, &["fin-tracer"]).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(&c, n, "6.18.44-fc-v669", "fin", all_true(TRACER_QUERIES)).await;
    }
    let _op = Operator::start(19474, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(
            "fin-tracer",
            test,
            json!({"maxUnavailable": "100%", "canary": 0}),
        ),
    )
    .await
    .unwrap();
    for n in &nodes {
        wait_for("assigned", 20, || async {
            assigned(&c, n, "fin-tracer").await
        })
        .await;
        sim_report(&c, n, "fin-tracer", 1, "Loaded").await;
    }
    let p = bpp.get("fin-tracer").await.unwrap();
    assert!(p.finalizers().contains(&"bpfpoly.io/unload".to_string()));
    bpp.delete("fin-tracer", &DeleteParams::default())
        .await
        .unwrap();
    for n in &nodes {
        wait_for("removed from node state", 20, || async {
            assigned(&c, n, "fin-tracer").await.is_none().then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        bpp.get_opt("fin-tracer").await.unwrap().is_some(),
        "deletion waits for the agents' Unloaded"
    );
    for n in &nodes {
        sim_report(&c, n, "fin-tracer", 1, "Unloaded").await;
    }
    wait_for("program deleted", 20, || async {
        bpp.get_opt("fin-tracer")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // A deleted Node takes its state and profile with it.
    let nodes_api: Api<Node> = Api::all(c.clone());
    nodes_api
        .delete("sim-fin-1", &DeleteParams::default())
        .await
        .unwrap();
    let states: Api<BpfNodeState> = Api::all(c.clone());
    let profiles: Api<BpfNodeProfile> = Api::all(c.clone());
    wait_for("state and profile removed", 20, || async {
        (states.get_opt("sim-fin-1").await.unwrap().is_none()
            && profiles.get_opt("sim-fin-1").await.unwrap().is_none())
        .then_some(())
    })
    .await;
    assert!(
        profiles.get_opt("sim-fin-0").await.unwrap().is_some(),
        "other nodes untouched"
    );
    cleanup(&c, test, &nodes, &[]).await;
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn delete_with_an_absent_agent_times_out_into_an_event_not_a_hang() {
    let c = client().await;
    let test = "tmo";
    let nodes = vec!["sim-tmo-0".to_string()];
    cleanup(&c, test, &nodes, &["tmo-tracer"]).await;
    sim_node(&c, &nodes[0], test).await;
    sim_profile(
        &c,
        &nodes[0],
        "6.18.44-fc-v669",
        "tmo",
        all_true(TRACER_QUERIES),
    )
    .await;
    let _op = Operator::start(19475, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(
            "tmo-tracer",
            test,
            json!({"maxUnavailable": 1, "canary": 0}),
        ),
    )
    .await
    .unwrap();
    wait_for("assigned", 20, || async {
        assigned(&c, &nodes[0], "tmo-tracer").await
    })
    .await;
    sim_report(&c, &nodes[0], "tmo-tracer", 1, "Loaded").await;
    bpp.delete("tmo-tracer", &DeleteParams::default())
        .await
        .unwrap();
    // The simulated agent never reports Unloaded; the operator gives up after --unload-timeout 10.
    wait_for("deletion after the timeout", 30, || async {
        bpp.get_opt("tmo-tracer")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let ev = wait_event(&c, "UnloadTimeout", "tmo-tracer").await;
    assert!(ev.note.unwrap().contains("sim-tmo-0"));
    cleanup(&c, test, &nodes, &[]).await;
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn a_standby_takes_over_within_the_lease_duration() {
    let c = client().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), "default");
    let _ = leases
        .delete("bpfpoly-test-lease", &DeleteParams::default())
        .await;
    let args = ["--lease-name", "bpfpoly-test-lease", "--lease-seconds", "4"];
    let mut a = Operator::start(19476, &[&args[..], &["--identity", "replica-a"]].concat());
    let holder = |c: Api<k8s_openapi::api::coordination::v1::Lease>| async move {
        c.get_opt("bpfpoly-test-lease")
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
    };
    wait_for("replica-a leads", 20, || async {
        holder(leases.clone()).await.filter(|h| h == "replica-a")
    })
    .await;
    let _b = Operator::start(19477, &[&args[..], &["--identity", "replica-b"]].concat());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder(leases.clone()).await.as_deref(),
        Some("replica-a"),
        "the standby waits while the leader renews"
    );
    let _ = a.0.kill();
    let _ = a.0.wait();
    let killed = Instant::now();
    wait_for("replica-b takes over", 20, || async {
        holder(leases.clone()).await.filter(|h| h == "replica-b")
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(4 + 3),
        "takeover took {took:?}, lease is 4 s (+ grace and polling)"
    );
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn a_leader_stopped_with_sigterm_hands_the_lease_to_the_standby_at_once() {
    let c = client().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), "default");
    let lease = "bpfpoly-test-lease-release";
    let _ = leases.delete(lease, &DeleteParams::default()).await;
    // A long term: a takeover well inside it can only come from the release.
    let args = ["--lease-name", lease, "--lease-seconds", "30"];
    let mut a = Operator::start(19478, &[&args[..], &["--identity", "replica-a"]].concat());
    let spec = |c: Api<k8s_openapi::api::coordination::v1::Lease>| async move {
        c.get_opt(lease).await.unwrap().and_then(|l| l.spec)
    };
    wait_for("replica-a leads", 20, || async {
        spec(leases.clone())
            .await
            .and_then(|s| s.holder_identity)
            .filter(|h| h == "replica-a")
    })
    .await;
    let _b = Operator::start(19479, &[&args[..], &["--identity", "replica-b"]].concat());
    // The standby is up (serving /healthz) before the leader goes.
    wait_for("replica-b serving", 20, || async {
        std::net::TcpStream::connect("127.0.0.1:19479").ok()
    })
    .await;
    let transitions = spec(leases.clone()).await.and_then(|s| s.lease_transitions);
    let pid = a.0.id().to_string();
    let sent = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("replica-b takes over", 10, || async {
        spec(leases.clone())
            .await
            .and_then(|s| s.holder_identity)
            .filter(|h| h == "replica-b")
    })
    .await;
    let took = sent.elapsed();
    let status = a.0.wait().unwrap();
    assert!(
        status.success(),
        "replica-a exits cleanly on SIGTERM: {status:?}"
    );
    let log = std::fs::read_to_string(Operator::log_path(19478)).unwrap();
    assert!(
        log.contains("released the lease"),
        "replica-a logs the release:\n{log}"
    );
    assert_eq!(
        spec(leases.clone()).await.and_then(|s| s.lease_transitions),
        transitions.map(|t| t + 1),
        "one transition"
    );
    println!("leader SIGTERM -> standby holds the lease after {took:?} (term 30 s)");
    assert!(
        took <= Duration::from_secs(3),
        "takeover took {took:?}: the released lease is taken at the standby's next poll (1 s)"
    );
}
