//! The operator against the real kube-apiserver, with **simulated nodes**: Node objects and
//! BpfNodeProfile statuses written by the test, and agent status written by the test where
//! a scenario needs an agent's report. No kernel is involved. Run by `make api-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
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
        let names: Vec<&str> = a.candidates.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["kprobe", "tp-btf", "tracepoint"]);
        let loginuid = a
            .config
            .iter()
            .find(|cfg| cfg.name == "read_loginuid")
            .unwrap();
        assert_eq!(loginuid.fell_back, i % 3 == 2, "{n}: {loginuid:?}");
        if loginuid.fell_back {
            assert_eq!(
                loginuid.reason.as_deref(),
                Some("field struct task_struct.loginuid missing on this kernel")
            );
        }
    }
    cleanup(&c, test, &nodes, &["shared-tracer"]).await;
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

    let count = |c: Client, nodes: Vec<String>, gen: i64| async move {
        let mut n = 0;
        for node in &nodes {
            if assigned(&c, node, "waves-tracer").await == Some(gen) {
                n += 1;
            }
        }
        n
    };
    wait_for("canary assigned", 20, || async {
        (count(c.clone(), nodes.clone(), 1).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(c.clone(), nodes.clone(), 1).await,
        1,
        "only the canary before it reports"
    );
    assert_eq!(assigned(&c, "sim-waves-0", "waves-tracer").await, Some(1));
    sim_report(&c, "sim-waves-0", "waves-tracer", 1, "Loaded").await;
    wait_for("first batch of 2", 20, || async {
        (count(c.clone(), nodes.clone(), 1).await == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(c.clone(), nodes.clone(), 1).await,
        3,
        "at most maxUnavailable in flight"
    );
    // The batch degrades: 2 of 3 updated nodes degraded > 0.5 -> pause.
    sim_report(&c, "sim-waves-1", "waves-tracer", 1, "Degraded").await;
    sim_report(&c, "sim-waves-2", "waves-tracer", 1, "Degraded").await;
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
        count(c.clone(), nodes.clone(), 1).await,
        3,
        "a paused rollout updates no further node"
    );
    let metrics = http_get_metrics(19473).await;
    assert!(
        metrics.contains("bpfpoly_rollout_paused{program=\"waves-tracer\"} 1"),
        "{metrics}"
    );

    // A spec change resumes: a new generation starts with the canary again.
    bpp.patch(
        "waves-tracer",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rollout": {"pauseOnDegradedRatio": 1.0}}})),
    )
    .await
    .unwrap();
    wait_for("generation 2 on the canary", 20, || async {
        (assigned(&c, "sim-waves-0", "waves-tracer").await == Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        assigned(&c, "sim-waves-4", "waves-tracer").await,
        None,
        "not-yet-reached nodes keep what they had (nothing)"
    );
    assert_eq!(
        assigned(&c, "sim-waves-1", "waves-tracer").await,
        Some(1),
        "reached nodes keep the old generation until their wave"
    );
    cleanup(&c, test, &nodes, &["waves-tracer"]).await;
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

/// Node loss and reboot, with simulated agents (the real ones are powered off and booted
/// again in `make kernels`): an agent that stops renewing its Lease is lost within
/// `--node-lost-after` plus a tick and a reconcile; a Lease naming a new boot makes the old
/// report stale; the node's first report from the new boot counts it again.
#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn a_silent_agent_is_lost_within_the_bound_and_a_rebooted_one_counts_after_it_reports() {
    let c = client().await;
    let test = "loss";
    let program = "loss-tracer";
    let nodes: Vec<String> = ["sim-loss-a", "sim-loss-b"].map(String::from).to_vec();
    cleanup(&c, test, &nodes, &[program]).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(&c, n, "6.18.44-fc-v669", "loss", all_true(TRACER_QUERIES)).await;
        sim_lease(&c, n, "boot-1").await;
    }
    let bound = 3;
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
    for n in &nodes {
        wait_for("generation 1 assigned", 20, || async {
            sim_lease(&c, &nodes[1], "boot-1").await;
            (assigned(&c, n, program).await == Some(1)).then_some(())
        })
        .await;
        sim_report_from_boot(&c, n, program, 1, "Loaded", Some("boot-1")).await;
    }
    wait_for("both loaded", 20, || async {
        sim_lease(&c, &nodes[1], "boot-1").await;
        let s = bpp.get(program).await.unwrap().status?;
        (s.nodes.loaded == 2 && s.nodes.lost == 0).then_some(())
    })
    .await;

    // b stops renewing: lost within the bound, named with why and since when.
    sim_lease(&c, &nodes[1], "boot-1").await;
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
    let ev = wait_event(&c, "NodeLost", program).await;
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

    // b boots again: its Lease names a new boot, so the old report (boot-1) is stale.
    sim_lease(&c, &nodes[1], "boot-2").await;
    let status = wait_for("b waiting for its new boot's report", 10, || async {
        sim_lease(&c, &nodes[1], "boot-2").await;
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
    wait_event(&c, "NodeRebooted", program).await;

    // Its agent loads afresh and reports from the new boot: counted again.
    sim_report_from_boot(&c, &nodes[1], program, 1, "Loaded", Some("boot-2")).await;
    let status = wait_for("b loaded again", 10, || async {
        sim_lease(&c, &nodes[1], "boot-2").await;
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
    let ev = wait_event(&c, "NodeReturned", program).await;
    assert!(
        ev.note
            .as_deref()
            .unwrap_or_default()
            .contains("node sim-loss-b: its agent is back"),
        "{:?}",
        ev.note
    );
    renew_a.abort();
    cleanup(&c, test, &nodes, &[program]).await;
}
