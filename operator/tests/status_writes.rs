//! Every status the operator writes is accepted by the CRD's own schema on the real
//! kube-apiserver, in every phase: valid, invalid (each program of `crds/examples/invalid/`
//! that the API server admits, applied with kubectl), no node selected, unsupported, paused
//! and deleting. A refusal is itself reported, as an Event and a metric. Nodes are
//! **simulated** (Node objects, profiles and agent reports written by the test). Run by
//! `make api-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bpfpoly_crds::BpfPolyProgram;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

#[path = "../../test-support/operator_fixtures.rs"]
mod fixtures;
use fixtures::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl is needed (make deps installs it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The Ready condition of a program once it describes `generation` (any generation if None).
async fn ready(
    c: &Client,
    name: &str,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    wait_for(&format!("Ready condition of {name}"), 20, || async {
        let p = bpp.get_opt(name).await.unwrap()?;
        let want = generation.or(p.metadata.generation);
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.observed_generation == want)
    })
    .await
}

fn refused_writes(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("bpfpoly_status_writes_refused_total{"))
        .collect()
}

fn assert_no_refused_write(port: u16, metrics: &str) {
    let log = std::fs::read_to_string(Operator::log_path(port)).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("status write refused") || l.contains("422"))
        .collect();
    assert!(
        refused.is_empty(),
        "the operator log holds refused status writes:\n{}",
        refused.join("\n")
    );
    assert!(refused_writes(metrics).is_empty(), "{metrics}");
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn every_invalid_program_applied_with_kubectl_gets_ready_false_invalid_with_its_path() {
    let c = client().await;
    let port = 19481;
    let _op = Operator::start(port, &["--no-leader-election"]);
    let mut dir: Vec<PathBuf> = std::fs::read_dir(repo().join("crds/examples/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    dir.sort();
    let (mut admitted, mut refused_by_schema, mut names) = (0, 0, Vec::new());
    for f in &dir {
        let text = std::fs::read_to_string(f).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()));
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("metadata: {name: "))
            .and_then(|l| l.strip_suffix('}'))
            .unwrap_or_else(|| panic!("{} has no `metadata: {{name: ...}}` line", f.display()))
            .to_string();
        match kubectl(&["apply", "-f", f.to_str().unwrap()]) {
            Err(e) => {
                // The schema refused it already: kubectl told the user, with the field.
                println!("{}: refused by the API server: {}", f.display(), e.trim());
                refused_by_schema += 1;
                continue;
            }
            Ok(_) => admitted += 1,
        }
        let cond = ready(&c, &name, None).await;
        println!(
            "{}: Ready={} {}: {}",
            f.display(),
            cond.status,
            cond.reason,
            cond.message
        );
        assert_eq!(cond.status, "False", "{}: {cond:?}", f.display());
        assert_eq!(cond.reason, "Invalid", "{}: {cond:?}", f.display());
        assert!(
            cond.message.contains(&format!("{expect}: ")),
            "{}: the message must name {expect}: {}",
            f.display(),
            cond.message
        );
        let ev = wait_event(&c, "Invalid", &name).await;
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert!(ev.note.unwrap_or_default().contains(expect));
        names.push(name);
    }
    println!("{admitted} admitted and reported Invalid, {refused_by_schema} refused by the schema");
    assert!(
        admitted >= 12,
        "only {admitted} of {} invalid programs were admitted",
        dir.len()
    );
    let metrics = http_get_metrics(port).await;
    assert_no_refused_write(port, &metrics);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    cleanup(&c, "invalid", &[], &names).await;
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn status_of_every_phase_is_accepted_by_the_crd_schema() {
    let c = client().await;
    let test = "phases";
    let nodes: Vec<String> = (0..3).map(|i| format!("sim-phases-{i}")).collect();
    let programs = [
        "ph-valid",
        "ph-none",
        "ph-unsup",
        "ph-paused",
        "ph-deleting",
        "ph-warn",
    ];
    cleanup(&c, test, &nodes, &programs).await;
    for n in &nodes {
        sim_node(&c, n, test).await;
        sim_profile(
            &c,
            n,
            "6.1.0-57-cloud-amd64",
            "phases",
            all_true(TRACER_QUERIES),
        )
        .await;
    }
    let port = 19482;
    let _op = Operator::start(port, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    let all = json!({"maxUnavailable": "100%", "canary": 0});

    valid_runs_everywhere(&c, &bpp, &nodes, test, &all).await;
    no_node_selected(&c, &bpp, &all).await;
    no_eligible_variant(&c, &bpp, test, &all).await;
    paused_when_degraded(&c, &bpp, &nodes, test).await;
    dead_fallback_warns(&c, &bpp, &nodes, test, &all).await;
    deleting_times_out(&c, &bpp, &nodes, test, &all).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = http_get_metrics(port).await;
    assert_no_refused_write(port, &metrics);
    cleanup(&c, test, &nodes, &programs).await;
}

/// Valid and running everywhere.
async fn valid_runs_everywhere(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    test: &str,
    all: &serde_json::Value,
) {
    bpp.create(
        &PostParams::default(),
        &tracer("ph-valid", test, all.clone()),
    )
    .await
    .unwrap();
    for n in nodes {
        wait_for("assigned", 20, || async {
            assigned(c, n, "ph-valid").await
        })
        .await;
        sim_report(c, n, "ph-valid", 1, "Loaded").await;
    }
    let r = ready(c, "ph-valid", Some(1)).await;
    let r = if r.status == "True" {
        r
    } else {
        wait_for("ph-valid Ready=True", 20, || async {
            let r = ready(c, "ph-valid", Some(1)).await;
            (r.status == "True").then_some(r)
        })
        .await
    };
    assert_eq!(r.reason, "Running", "{r:?}");
}

/// A selector that matches no node: said plainly, not Ready.
async fn no_node_selected(c: &kube::Client, bpp: &Api<BpfPolyProgram>, all: &serde_json::Value) {
    let mut none = tracer("ph-none", "no-such-test", all.clone());
    none.spec.node_selector = Some(
        serde_json::from_value(json!({"matchLabels": {"bpfpoly.io/test": "no-such-test"}}))
            .unwrap(),
    );
    bpp.create(&PostParams::default(), &none).await.unwrap();
    let r = ready(c, "ph-none", Some(1)).await;
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "NoNodesSelected"),
        "{r:?}"
    );
    let ev = wait_event(c, "NoNodesSelected", "ph-none").await;
    assert!(
        ev.note.unwrap().contains("no-such-test"),
        "the Event names the selector"
    );
}

/// No eligible variant on any node.
async fn no_eligible_variant(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    test: &str,
    all: &serde_json::Value,
) {
    let mut unsup = tracer("ph-unsup", test, all.clone());
    unsup.spec.variants.retain(|v| v.name == "tp-btf");
    unsup.spec.variants[0].requires.kernel = Some(">=9.0".into());
    bpp.create(&PostParams::default(), &unsup).await.unwrap();
    let r = ready(c, "ph-unsup", Some(1)).await;
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "NoEligibleNode"),
        "{r:?}"
    );
}

/// Paused: every updated node degraded.
async fn paused_when_degraded(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    test: &str,
) {
    bpp.create(
        &PostParams::default(),
        &tracer(
            "ph-paused",
            test,
            json!({"maxUnavailable": "100%", "canary": 0, "pauseOnDegradedRatio": 0.5}),
        ),
    )
    .await
    .unwrap();
    for n in nodes {
        wait_for("assigned", 20, || async {
            assigned(c, n, "ph-paused").await
        })
        .await;
        sim_report(c, n, "ph-paused", 1, "Degraded").await;
    }
    let paused = wait_for("paused rollout", 20, || async {
        let s = bpp.get("ph-paused").await.unwrap().status?;
        s.rollout.paused.then_some(s)
    })
    .await;
    assert!(paused
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == "RolloutPaused"));
}

/// A dead fallback: a warning in status and an Event; the program runs.
async fn dead_fallback_warns(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    test: &str,
    all: &serde_json::Value,
) {
    let mut warn = tracer("ph-warn", test, all.clone());
    warn.spec.config.push(
        serde_json::from_value(
            json!({"name": "sample_every", "type": "u32", "value": "1", "fallback": "1"}),
        )
        .unwrap(),
    );
    bpp.create(&PostParams::default(), &warn).await.unwrap();
    let warned = wait_for("status.warnings", 20, || async {
        let s = bpp.get("ph-warn").await.unwrap().status?;
        (!s.warnings.is_empty()).then_some(s.warnings)
    })
    .await;
    assert!(
        warned[0].starts_with("spec.config[2].fallback: is never used"),
        "{warned:?}"
    );
    let ev = wait_event(c, "SpecWarning", "ph-warn").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    for n in nodes {
        wait_for("ph-warn assigned despite the warning", 20, || async {
            assigned(c, n, "ph-warn").await
        })
        .await;
    }
}

/// Deleting, with agents that never confirm: the unload timeout is written to status.
async fn deleting_times_out(
    c: &kube::Client,
    bpp: &Api<BpfPolyProgram>,
    nodes: &[String],
    test: &str,
    all: &serde_json::Value,
) {
    bpp.create(
        &PostParams::default(),
        &tracer("ph-deleting", test, all.clone()),
    )
    .await
    .unwrap();
    for n in nodes {
        wait_for("assigned", 20, || async {
            assigned(c, n, "ph-deleting").await
        })
        .await;
        sim_report(c, n, "ph-deleting", 1, "Loaded").await;
    }
    bpp.delete("ph-deleting", &DeleteParams::default())
        .await
        .unwrap();
    // The operator gives up after its --unload-timeout of 10 s.
    wait_event_within(c, "UnloadTimeout", "ph-deleting", 30).await;
    wait_for("ph-deleting gone", 30, || async {
        bpp.get_opt("ph-deleting")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn a_refused_status_write_is_reported_as_an_event_and_a_metric() {
    let c = client().await;
    let test = "refused";
    let nodes = vec!["sim-refused-0".to_string()];
    cleanup(&c, test, &nodes, &["refused-tracer"]).await;
    sim_node(&c, &nodes[0], test).await;
    sim_profile(
        &c,
        &nodes[0],
        "6.1.0-57-cloud-amd64",
        "refused",
        all_true(TRACER_QUERIES),
    )
    .await;
    // Make the CRD's status schema stricter than what the operator writes (a stand-in for a
    // schema and operator that disagree): a variant summary of at most one character.
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let mut crd = bpfpoly_crds::crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some("bpfpolyprograms.bpfpoly.io"))
        .unwrap();
    let mut v = serde_json::to_value(&crd).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["variantSummary"]["maxLength"] = json!(1);
    crd = serde_json::from_value(v).unwrap();
    crds.patch(
        "bpfpolyprograms.bpfpoly.io",
        &PatchParams::apply(PP).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let port = 19483;
    let _op = Operator::start(port, &["--no-leader-election"]);
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    bpp.create(
        &PostParams::default(),
        &tracer(
            "refused-tracer",
            test,
            json!({"maxUnavailable": "100%", "canary": 0}),
        ),
    )
    .await
    .unwrap();
    wait_for("assigned", 20, || async {
        assigned(&c, &nodes[0], "refused-tracer").await
    })
    .await;
    sim_report(&c, &nodes[0], "refused-tracer", 1, "Loaded").await;
    let ev = wait_event(&c, "StatusWriteRefused", "refused-tracer").await;
    let note = ev.note.unwrap_or_default();
    assert!(
        note.contains("422") && note.contains("variantSummary"),
        "{note}"
    );
    let metrics = wait_for("refused-write metric", 20, || async {
        let m = http_get_metrics(port).await;
        m.contains("bpfpoly_status_writes_refused_total{program=\"refused-tracer\"}")
            .then_some(m)
    })
    .await;
    assert!(!refused_writes(&metrics).is_empty());

    // Restore the real CRD.
    drop(client().await);
    cleanup(&c, test, &nodes, &["refused-tracer"]).await;
}
