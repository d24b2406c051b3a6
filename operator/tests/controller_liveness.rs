//! Node liveness against the real kube-apiserver, with **simulated nodes and agents** (Node
//! objects, agent Leases and status written by the test; no kernel): a silent agent is lost
//! within the bound, and a rebooted one counts again once it reports. Run by `make api-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bpfpoly_crds::BpfPolyProgram;
use kube::api::{Api, PostParams};
use serde_json::json;

#[path = "../../test-support/operator_fixtures.rs"]
mod fixtures;
use fixtures::*;

/// Node loss and reboot, with simulated agents (the real ones are powered off and booted
/// again in `make kernels`): an agent that stops renewing its Lease is lost within
/// `--node-lost-after` plus a tick and a reconcile; a Lease naming a new boot makes the old
/// report stale; the node's first report from the new boot counts it again.
#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn a_silent_agent_is_lost_within_the_bound_and_a_rebooted_one_counts_after_it_reports() {
    let c = client().await;
    let (test, program, bound) = ("loss", "loss-tracer", 3);
    let nodes: Vec<String> = ["sim-loss-a", "sim-loss-b"].map(String::from).to_vec();
    cleanup(&c, test, &nodes, &[program]).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(&c, n, "6.18.44-fc-v669", "loss", all_true(TRACER_QUERIES)).await;
        sim_lease(&c, n, "boot-1").await;
    }
    let _op = Operator::start(
        19479,
        &[
            "--no-leader-election",
            "--node-lost-after",
            &bound.to_string(),
        ],
    );
    // Node a's agent keeps renewing; b's renews until it "powers off".
    let (c2, a) = (c.clone(), nodes[0].clone());
    let renew_a = tokio::spawn(async move {
        loop {
            sim_lease(&c2, &a, "boot-1").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    both_loaded(&c, &bpp, &nodes, program, test).await;
    b_is_lost_within_the_bound(&c, &bpp, &nodes, program, bound).await;
    b_rebooted_waits_for_its_new_report(&c, &bpp, &nodes, program).await;
    b_counts_again_after_reporting(&c, &bpp, &nodes, program).await;
    renew_a.abort();
    cleanup(&c, test, &nodes, &[program]).await;
}

/// The program created, assigned to both nodes and reported Loaded from boot-1 by both.
async fn both_loaded(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    program: &str,
    test: &str,
) {
    bpp.create(
        &PostParams::default(),
        &tracer(
            program,
            test,
            json!({"maxUnavailable": "100%", "canary": 0}),
        ),
    )
    .await
    .unwrap();
    for n in nodes {
        wait_for("generation 1 assigned", 20, || async {
            sim_lease(c, &nodes[1], "boot-1").await;
            (assigned(c, n, program).await == Some(1)).then_some(())
        })
        .await;
        sim_report_from_boot(c, n, program, 1, "Loaded", Some("boot-1")).await;
    }
    wait_for("both loaded", 20, || async {
        sim_lease(c, &nodes[1], "boot-1").await;
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 2 && s.nodes.lost == 0).then_some(())
    })
    .await;
}

/// b stops renewing: lost within the bound, named with why and since when.
async fn b_is_lost_within_the_bound(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    program: &str,
    bound: u64,
) {
    sim_lease(c, &nodes[1], "boot-1").await;
    let silent = Instant::now();
    let status = wait_for("b lost", 20, || async {
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.lost == 1).then_some(s)
    })
    .await;
    let took = silent.elapsed();
    eprintln!(
        "node lost {:.1} s after its last renewal (bound {bound} s)",
        took.as_secs_f64()
    );
    assert!(
        took >= Duration::from_secs(bound) && took <= Duration::from_secs(bound + 3),
        "lost after {took:?}, bound {bound} s"
    );
    assert_eq!((status.nodes.loaded, status.nodes.eligible), (1, 2));
    let sample = status
        .samples
        .iter()
        .find(|s| s.node == "sim-loss-b")
        .expect("b sampled");
    assert_eq!(sample.phase, "Lost");
    for part in [
        "agent silent since ",
        "Lease kube-node-lease/bpfpoly-agent-sim-loss-b not renewed for",
        "--node-lost-after 3 s",
        "last reported Loaded (tracepoint)",
    ] {
        assert!(
            sample.reason.contains(part),
            "{part:?} in {}",
            sample.reason
        );
    }
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NodesLost")
    );
    assert!(
        ready.message.contains("sim-loss-b (agent silent since"),
        "{}",
        ready.message
    );
    let ev = wait_event(c, "NodeLost", program).await;
    assert!(
        ev.note
            .as_deref()
            .unwrap_or_default()
            .starts_with("node sim-loss-b: agent silent since"),
        "{:?}",
        ev.note
    );
    let metrics = http_get_metrics(19479).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("bpfpoly_nodes{")
            && l.contains("phase=\"lost\"")
            && l.contains(&format!("program=\"{program}\""))
            && l.ends_with(" 1")),
        "the lost gauge is 1"
    );
}

/// b boots again: its Lease names a new boot, so the old report (boot-1) is stale.
async fn b_rebooted_waits_for_its_new_report(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    program: &str,
) {
    sim_lease(c, &nodes[1], "boot-2").await;
    let status = wait_for("b waiting for its new boot's report", 10, || async {
        sim_lease(c, &nodes[1], "boot-2").await;
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.lost == 0 && s.nodes.pending == 1).then_some(s)
    })
    .await;
    assert_eq!(status.nodes.loaded, 1);
    let sample = status
        .samples
        .iter()
        .find(|s| s.node == "sim-loss-b")
        .expect("b sampled");
    assert_eq!(sample.phase, "Pending");
    assert!(
        sample
            .reason
            .contains("booted again (boot boot-2; the report is from boot-1)"),
        "{}",
        sample.reason
    );
    wait_event(c, "NodeRebooted", program).await;
}

/// Its agent loads afresh and reports from the new boot: counted again.
async fn b_counts_again_after_reporting(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    program: &str,
) {
    sim_report_from_boot(c, &nodes[1], program, 1, "Loaded", Some("boot-2")).await;
    let status = wait_for("b loaded again", 10, || async {
        sim_lease(c, &nodes[1], "boot-2").await;
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 2).then_some(s)
    })
    .await;
    assert_eq!((status.nodes.lost, status.nodes.pending), (0, 0));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True", "{}", ready.message);
    let ev = wait_event(c, "NodeReturned", program).await;
    assert!(
        ev.note
            .as_deref()
            .unwrap_or_default()
            .contains("node sim-loss-b: its agent is back"),
        "{:?}",
        ev.note
    );
}
