//! Fixtures of the operator's tests against the real kube-apiserver, with **simulated
//! nodes**: Node objects, BpfNodeProfile statuses and agent reports written by the test.
//! Included with `#[path]` by `operator/tests/controller.rs` and `status_writes.rs`.

// Each including test uses a different part.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

pub const PP: &str = "bpfpoly-test";

/// An operator process under test; killed on drop.
pub struct Operator(pub Child);

impl Operator {
    /// Its log file (stdout and stderr).
    pub fn log_path(port: u16) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("operator-test-{port}.log"))
    }

    pub fn start(port: u16, extra: &[&str]) -> Operator {
        let log = std::fs::File::create(Self::log_path(port)).unwrap();
        // Simulated agents renew no liveness Lease (see `sim_lease`): unless a test sets its
        // own bound, nodes without one count as alive for the whole test.
        let liveness: &[&str] = if extra.contains(&"--node-lost-after") {
            &[]
        } else {
            &["--node-lost-after", "3600"]
        };
        let child = Command::new(operator_bin())
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--unload-timeout",
                "10",
            ])
            .args(liveness)
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Operator(child)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn client() -> Client {
    std::env::var("KUBECONFIG").expect("KUBECONFIG is not set: run `make api-test`");
    let c = Client::try_default().await.unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(c.clone());
    for crd in bpfpoly_crds::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply(PP).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c
}

/// Creates a simulated node with a label naming the test.
pub async fn sim_node(c: &Client, name: &str, test: &str) {
    let nodes: Api<Node> = Api::all(c.clone());
    let n = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"bpfpoly.io/test": test, "bpfpoly.io/simulated": "true"}}});
    nodes
        .patch(name, &PatchParams::apply(PP).force(), &Patch::Apply(&n))
        .await
        .unwrap();
}

/// Publishes a simulated agent profile.
pub async fn sim_profile(
    c: &Client,
    node: &str,
    release: &str,
    sha: &str,
    answers: serde_json::Value,
) {
    let api: Api<BpfNodeProfile> = Api::all(c.clone());
    let manager = bpfpoly_crds::state::agent_field_manager(node);
    let pp = PatchParams::apply(&manager).force();
    api.patch(node, &pp, &Patch::Apply(&json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "metadata": {"name": node}, "spec": {}})))
        .await
        .unwrap();
    let status = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "status": {
        "kernel": {"release": release, "version": release},
        "btf": {"available": true, "source": "simulated", "sha256": sha, "types": 100},
        "programTypes": ["kprobe", "tracepoint", "tracing", "xdp", "sched_cls"],
        "mapTypes": ["ringbuf", "prog_array", "percpu_array"],
        "answers": answers}});
    api.patch_status(node, &pp, &Patch::Apply(&status))
        .await
        .unwrap();
}

/// Publishes a simulated agent report for one program on one node.
pub async fn sim_report(c: &Client, node: &str, program: &str, generation: i64, phase: &str) {
    sim_report_from_boot(c, node, program, generation, phase, None).await;
}

/// Publishes a simulated agent report that names the kernel boot it comes from.
pub async fn sim_report_from_boot(
    c: &Client,
    node: &str,
    program: &str,
    generation: i64,
    phase: &str,
    boot: Option<&str>,
) {
    let api: Api<BpfNodeState> = Api::all(c.clone());
    let mut status = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState", "status": {
        "programs": [{"name": program, "observedGeneration": generation, "phase": phase, "variant": "tracepoint",
                      "message": format!("simulated {phase}")}]}});
    if let Some(b) = boot {
        status["status"]["bootId"] = json!(b);
    }
    api.patch_status(
        node,
        &PatchParams::apply(&bpfpoly_crds::state::agent_field_manager(node)).force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
}

/// Renews a simulated agent's liveness Lease once, as the agent does every few seconds
/// (`kube-node-lease/bpfpoly-agent-<node>`, naming the boot).
pub async fn sim_lease(c: &Client, node: &str, boot: &str) {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), bpfpoly_crds::state::NODE_LEASE_NAMESPACE);
    let name = bpfpoly_crds::state::agent_lease_name(node);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "labels": {bpfpoly_crds::state::AGENT_LEASE_LABEL: "true"},
                     "annotations": {bpfpoly_crds::state::BOOT_ID_ANNOTATION: boot}},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 20,
                 "renewTime": format!("{:.6}", k8s_openapi::jiff::Timestamp::now())}});
    api.patch(
        &name,
        &PatchParams::apply(&bpfpoly_crds::state::agent_field_manager(node)).force(),
        &Patch::Apply(&lease),
    )
    .await
    .unwrap();
}

/// Deletes a simulated agent's liveness Lease.
pub async fn delete_lease(c: &Client, node: &str) {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), bpfpoly_crds::state::NODE_LEASE_NAMESPACE);
    let _ = api
        .delete(
            &bpfpoly_crds::state::agent_lease_name(node),
            &DeleteParams::default(),
        )
        .await;
}

pub fn tracer(name: &str, test: &str, rollout: serde_json::Value) -> BpfPolyProgram {
    let mut v: serde_json::Value =
        serde_yaml::from_str(include_str!("../crds/examples/exec-tracer.yaml")).unwrap();
    v["metadata"]["name"] = json!(name);
    v["spec"]["nodeSelector"] = json!({"matchLabels": {"bpfpoly.io/test": test}});
    v["spec"]["rollout"] = rollout;
    serde_json::from_value(v).unwrap()
}

/// The first Event with `reason` about program `program` (Events live in `default`).
pub async fn wait_event(
    c: &Client,
    reason: &str,
    program: &str,
) -> k8s_openapi::api::events::v1::Event {
    wait_event_within(c, reason, program, 10).await
}

/// [`wait_event`] with its own time limit, for Events that follow a timeout of their own.
pub async fn wait_event_within(
    c: &Client,
    reason: &str,
    program: &str,
    secs: u64,
) -> k8s_openapi::api::events::v1::Event {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.clone(), "default");
    wait_for(&format!("{reason} Event"), secs, || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(program)
            })
    })
    .await
}

pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn assigned(c: &Client, node: &str, program: &str) -> Option<i64> {
    let api: Api<BpfNodeState> = Api::all(c.clone());
    api.get_opt(node)
        .await
        .unwrap()?
        .spec
        .programs
        .iter()
        .find(|a| a.name == program)
        .map(|a| a.generation)
}

pub async fn cleanup(c: &Client, test: &str, nodes: &[String], programs: &[&str]) {
    let bpp: Api<BpfPolyProgram> = Api::all(c.clone());
    for p in programs {
        if bpp.get_opt(p).await.unwrap().is_some() {
            let _ = bpp
                .patch(
                    p,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
            let _ = bpp.delete(p, &DeleteParams::default()).await;
        }
    }
    let nodes_api: Api<Node> = Api::all(c.clone());
    let states: Api<BpfNodeState> = Api::all(c.clone());
    let profiles: Api<BpfNodeProfile> = Api::all(c.clone());
    for n in nodes {
        let _ = nodes_api.delete(n, &DeleteParams::default()).await;
        let _ = states.delete(n, &DeleteParams::default()).await;
        let _ = profiles.delete(n, &DeleteParams::default()).await;
        delete_lease(c, n).await;
    }
    let _ = test;
}

pub fn all_true(queries: &[&str]) -> serde_json::Value {
    queries
        .iter()
        .map(|q| (q.to_string(), json!(true)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub const TRACER_QUERIES: &[&str] = &[
    "field:struct task_struct.loginuid",
    "helper:kprobe:bpf_ringbuf_output",
    "helper:tracepoint:bpf_ringbuf_output",
    "helper:tracing:bpf_ringbuf_output",
    "type:struct linux_binprm",
];

/// The operator binary under test (set by Cargo for the including integration test).
fn operator_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bpfpoly-operator")
}

/// The operator's `/metrics` text.
pub async fn http_get_metrics(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}
