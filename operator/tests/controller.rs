//! The operator against the real kube-apiserver, with **simulated nodes**: Node objects and
//! BpfNodeProfile statuses written by the test, and agent status written by the test where
//! a scenario needs an agent's report. No kernel is involved. Run by `make api-test`.
//! Decisions, rollout and trust; deletion and leases are in `controller_lifecycle.rs`, node
//! loss in `controller_liveness.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bpfpoly_crds::state::AssignedProgram;
use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

#[path = "../../test-support/operator_fixtures.rs"]
mod fixtures;
use fixtures::*;

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn nodes_of_one_btf_build_are_asked_once_and_share_answers() {
    let c = client().await;
    let test = "shared";
    let nodes: Vec<String> = (0..9).map(|i| format!("sim-shared-{i}")).collect();
    cleanup(&c, test, &nodes, &["shared-tracer"]).await;
    for (i, n) in nodes.iter().enumerate() {
        sim_node(&c, n, test).await;
        // Three kernel builds; profiles carry no answers yet.
        sim_profile(
            &c,
            n,
            "6.1.0-56-cloud-amd64",
            &format!("build{}", i % 3),
            json!({}),
        )
        .await;
    }
    let _op = Operator::start(19471, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(
            "shared-tracer",
            test,
            json!({"maxUnavailable": "100%", "canary": 0}),
        ),
    )
    .await
    .unwrap();

    let profiles: Api<BpfNodeProfile> = Api::all(c.clone());
    let asked = wait_for("queries on one node per build", 20, || async {
        let mut asked = Vec::new();
        for n in &nodes {
            if !profiles.get(n).await.unwrap().spec.queries.is_empty() {
                asked.push(n.clone());
            }
        }
        (asked.len() == 3).then_some(asked)
    })
    .await;
    assert_eq!(
        asked,
        ["sim-shared-0", "sim-shared-1", "sim-shared-2"],
        "the first node of each build answers"
    );
    let status = bpp.get("shared-tracer").await.unwrap().status.unwrap();
    assert_eq!(
        status.nodes.pending, 9,
        "unanswered nodes are pending, not failed: {:?}",
        status.nodes
    );
    assert_eq!(status.nodes.failed, 0);

    // Only the representatives answer; build2 lacks loginuid.
    for (i, n) in asked.iter().enumerate() {
        let mut answers = all_true(TRACER_QUERIES);
        if i == 2 {
            answers["field:struct task_struct.loginuid"] = json!(false);
        }
        sim_profile(&c, n, "6.1.0-56-cloud-amd64", &format!("build{i}"), answers).await;
    }
    let states: Api<BpfNodeState> = Api::all(c.clone());
    for (i, n) in nodes.iter().enumerate() {
        let st = wait_for(&format!("assignment on {n}"), 20, || async {
            states
                .get_opt(n)
                .await
                .unwrap()
                .filter(|s| s.spec.programs.iter().any(|a| a.name == "shared-tracer"))
        })
        .await;
        // Other programs (e.g. `make run`'s samples) may select these nodes too.
        let a = st
            .spec
            .programs
            .iter()
            .find(|a| a.name == "shared-tracer")
            .expect("shared-tracer assigned");
        check_compact_entry(a, n, i % 3 == 2);
        check_stored_fallbacks(&c, n, i % 3 == 2).await;
    }
    cleanup(&c, test, &nodes, &["shared-tracer"]).await;
}

/// As the API server stores it: the fallback once per node, naming the programs it applies
/// to, and no per-program copy.
async fn check_stored_fallbacks(c: &Client, n: &str, without_loginuid: bool) {
    let raw: Api<kube::api::DynamicObject> = Api::all_with(
        c.clone(),
        &kube::api::ApiResource::erase::<BpfNodeState>(&()),
    );
    let spec = &raw.get(n).await.unwrap().data["spec"];
    let entry = spec["programs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shared-tracer")
        .unwrap();
    assert!(entry.get("configFallbacks").is_none(), "{n}: {spec}");
    let stored: Vec<&serde_json::Value> = spec["configFallbacks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            f["programs"]
                .as_array()
                .unwrap()
                .contains(&json!("shared-tracer"))
        })
        .collect();
    if without_loginuid {
        assert_eq!(
            stored,
            [&json!({"name": "read_loginuid",
                "reason": "field struct task_struct.loginuid missing on this kernel",
                "programs": ["shared-tracer"]})],
            "{n}: {spec}"
        );
    } else {
        assert!(stored.is_empty(), "{n}: {spec}");
    }
}

/// Only what differs per node: the variant names in order and the globals that fell back
/// (on the third build, without loginuid), with why; the agent reads the rest from the
/// program at this generation.
fn check_compact_entry(a: &AssignedProgram, n: &str, without_loginuid: bool) {
    assert_eq!(a.variants, ["kprobe", "tp-btf", "tracepoint"]);
    let fell: Vec<(&str, &str)> = a
        .config_fallbacks
        .iter()
        .map(|f| (f.name.as_str(), f.reason.as_str()))
        .collect();
    if without_loginuid {
        assert_eq!(
            fell,
            [(
                "read_loginuid",
                "field struct task_struct.loginuid missing on this kernel"
            )],
            "{n}"
        );
    } else {
        assert_eq!(fell, [], "{n}");
    }
    let entry = serde_json::to_string(a).unwrap();
    assert!(!entry.contains("bytecode"), "{n}: {entry}");
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn unsupported_nodes_are_named_in_status_and_events() {
    let c = client().await;
    let test = "unsup";
    let nodes = vec!["sim-unsup-old".to_string()];
    cleanup(&c, test, &nodes, &["unsup-tracer"]).await;
    sim_node(&c, &nodes[0], test).await;
    let mut answers = all_true(TRACER_QUERIES);
    answers["type:struct linux_binprm"] = json!(false);
    sim_profile(&c, &nodes[0], "4.19.0-27-amd64", "old", answers).await;
    let _op = Operator::start(19472, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    let mut p = tracer(
        "unsup-tracer",
        test,
        json!({"maxUnavailable": 1, "canary": 0}),
    );
    // Only the tp-btf variant, which needs kernel >= 5.5.
    p.spec.variants.retain(|v| v.name == "tp-btf");
    bpp.create(&PostParams::default(), &p).await.unwrap();
    let cond = wait_for("Unsupported condition", 20, || async {
        let s = bpp.get("unsup-tracer").await.unwrap().status?;
        s.conditions
            .into_iter()
            .find(|c| c.type_ == "Unsupported" && c.status == "True")
    })
    .await;
    assert!(
        cond.message.contains(
            "sim-unsup-old (variant tp-btf: kernel >=5.5 kernel is 4.19.0 (4.19.0-27-amd64))"
        ),
        "{}",
        cond.message
    );
    let ev = wait_event(&c, "NoEligibleVariant", "unsup-tracer").await;
    assert!(ev.note.unwrap().contains("node sim-unsup-old"));
    assert_eq!(
        assigned(&c, &nodes[0], "unsup-tracer").await,
        None,
        "nothing assigned to an unsupported node"
    );
    cleanup(&c, test, &nodes, &["unsup-tracer"]).await;
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn rollout_waves_canary_then_batches_then_pause_and_resume() {
    let c = client().await;
    let test = "waves";
    let nodes: Vec<String> = (0..5).map(|i| format!("sim-waves-{i}")).collect();
    cleanup(&c, test, &nodes, &["waves-tracer"]).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(&c, n, "6.18.44-fc-v669", "waves", all_true(TRACER_QUERIES)).await;
    }
    let _op = Operator::start(19473, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(
            "waves-tracer",
            test,
            json!({"maxUnavailable": 2, "canary": 1, "pauseOnDegradedRatio": 0.5}),
        ),
    )
    .await
    .unwrap();
    canary_then_first_batch(&c, &nodes).await;
    degraded_batch_pauses(&c, &bpp, &nodes).await;
    spec_change_resumes(&c, &bpp).await;
    cleanup(&c, test, &nodes, &["waves-tracer"]).await;
}

/// How many of `nodes` carry generation `generation` of waves-tracer.
async fn carrying(c: &Client, nodes: &[String], generation: i64) -> usize {
    let mut n = 0;
    for node in nodes {
        if assigned(c, node, "waves-tracer").await == Some(generation) {
            n += 1;
        }
    }
    n
}

/// Waits until `want` of `nodes` carry generation 1, and checks that no more follow.
async fn wave_reaches(c: &Client, nodes: &[String], what: &str, want: usize, why: &str) {
    wait_for(what, 20, || async {
        (carrying(c, nodes, 1).await == want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(carrying(c, nodes, 1).await, want, "{why}");
}

/// The canary alone first; after it reports Loaded, a batch of maxUnavailable (2).
async fn canary_then_first_batch(c: &Client, nodes: &[String]) {
    wave_reaches(
        c,
        nodes,
        "canary assigned",
        1,
        "only the canary before it reports",
    )
    .await;
    assert_eq!(assigned(c, "sim-waves-0", "waves-tracer").await, Some(1));
    sim_report(c, "sim-waves-0", "waves-tracer", 1, "Loaded").await;
    wave_reaches(
        c,
        nodes,
        "first batch of 2",
        3,
        "at most maxUnavailable in flight",
    )
    .await;
}

/// The batch degrades: 2 of 3 updated nodes degraded > 0.5 -> pause, told in the status
/// and the metrics, and no further node is updated.
async fn degraded_batch_pauses(c: &Client, bpp: &Api<BpfPolyProgram>, nodes: &[String]) {
    sim_report(c, "sim-waves-1", "waves-tracer", 1, "Degraded").await;
    sim_report(c, "sim-waves-2", "waves-tracer", 1, "Degraded").await;
    let st = wait_for("paused", 20, || async {
        bpp.get("waves-tracer")
            .await
            .unwrap()
            .status
            .filter(|s| s.rollout.paused)
    })
    .await;
    assert!(
        st.rollout.message.contains("2 of 3 updated nodes degraded"),
        "{}",
        st.rollout.message
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        carrying(c, nodes, 1).await,
        3,
        "a paused rollout updates no further node"
    );
    let metrics = http_get_metrics(19473).await;
    assert!(
        metrics.contains("bpfpoly_rollout_paused{program=\"waves-tracer\"} 1"),
        "{metrics}"
    );
}

/// A spec change resumes: a new generation starts with the canary again.
async fn spec_change_resumes(c: &Client, bpp: &Api<BpfPolyProgram>) {
    bpp.patch(
        "waves-tracer",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rollout": {"pauseOnDegradedRatio": 1.0}}})),
    )
    .await
    .unwrap();
    wait_for("generation 2 on the canary", 20, || async {
        (assigned(c, "sim-waves-0", "waves-tracer").await == Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        assigned(c, "sim-waves-4", "waves-tracer").await,
        None,
        "not-yet-reached nodes keep what they had (nothing)"
    );
    assert_eq!(
        assigned(c, "sim-waves-1", "waves-tracer").await,
        Some(1),
        "reached nodes keep the old generation until their wave"
    );
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn status_written_for_another_node_is_ignored_and_reported() {
    let c = client().await;
    let test = "trust";
    let nodes = vec!["sim-trust-a".to_string(), "sim-trust-b".to_string()];
    let program = "trust-tracer";
    cleanup(&c, test, &nodes, &[program]).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(&c, n, "6.6.0-1-amd64", "trust", all_true(TRACER_QUERIES)).await;
    }
    let _op = Operator::start(19478, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(program, test, json!({"maxUnavailable": 2, "canary": 0})),
    )
    .await
    .unwrap();
    for n in &nodes {
        wait_for("generation 1 assigned", 20, || async {
            (assigned(&c, n, program).await == Some(1)).then_some(())
        })
        .await;
    }
    // Other node states of the cluster may be ignored too: compare with the count before.
    let baseline = ignored_states(19478).await;
    // Node b's agent (simulated) writes node a's status, claiming it runs there.
    let states: Api<BpfNodeState> = Api::all(c.clone());
    let forged = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState", "status": {
        "programs": [{"name": program, "observedGeneration": 1, "phase": "Loaded", "variant": "tracepoint"}]}});
    states
        .patch_status(
            "sim-trust-a",
            &PatchParams::apply(&bpfpoly_crds::state::agent_field_manager("sim-trust-b")).force(),
            &Patch::Apply(&forged),
        )
        .await
        .unwrap();
    sim_report(&c, "sim-trust-b", program, 1, "Loaded").await;
    let status = wait_for("b counted, a ignored", 20, || async {
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 1 && s.nodes.pending == 1).then_some(s)
    })
    .await;
    let sample = status
        .samples
        .iter()
        .find(|s| s.node == "sim-trust-a")
        .expect("node a is sampled as pending");
    assert_eq!(sample.phase, "Pending");
    assert!(
        sample.reason.contains("\"bpfpoly-agent/sim-trust-b\"")
            && sample.reason.contains("\"bpfpoly-agent/sim-trust-a\""),
        "{}",
        sample.reason
    );
    let ev = wait_event(&c, "UntrustedNodeStatus", program).await;
    assert!(
        ev.note.as_deref().unwrap_or_default().starts_with(
            "node sim-trust-a: status written by field manager \"bpfpoly-agent/sim-trust-b\""
        ),
        "{:?}",
        ev.note
    );
    assert_eq!(ignored_states(19478).await, baseline + 1);

    // Node a's own agent reports: its whole status list is now its own, and believed.
    sim_report(&c, "sim-trust-a", program, 1, "Loaded").await;
    wait_for("both loaded", 20, || async {
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 2 && s.nodes.pending == 0).then_some(())
    })
    .await;
    wait_for("the gauge back at its baseline", 10, || async {
        (ignored_states(19478).await == baseline).then_some(())
    })
    .await;

    // Even its own agent is not believed when it reports a generation never assigned.
    sim_report(&c, "sim-trust-a", program, 7, "Loaded").await;
    let status = wait_for("generation 7 refused", 20, || async {
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 1).then_some(s)
    })
    .await;
    let sample = status
        .samples
        .iter()
        .find(|s| s.node == "sim-trust-a")
        .expect("node a is sampled");
    assert!(
        sample.reason.contains("reports generation 7"),
        "{}",
        sample.reason
    );
    cleanup(&c, test, &nodes, &[program]).await;
}

/// `bpfpoly_ignored_node_status{kind="state"}` as the operator serves it.
async fn ignored_states(port: u16) -> i64 {
    let metrics = http_get_metrics(port).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("bpfpoly_ignored_node_status{kind=\"state\"} "))
        .unwrap_or_else(|| panic!("no ignored-state gauge in {metrics}"))
        .parse()
        .unwrap()
}
