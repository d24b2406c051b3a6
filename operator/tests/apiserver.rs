//! Against the real kube-apiserver (Kubernetes 1.20 from `make cluster-up`): the generated
//! CRDs apply, every sample round-trips, the schema rejects what it should, and `kubectl get`
//! shows the printer columns. Run by `make api-test`, which starts the server and sets
//! KUBECONFIG; these tests are `#[ignore]`d in a plain `cargo test` because they need it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn client() -> Client {
    let kc = std::env::var("KUBECONFIG")
        .expect("KUBECONFIG is not set: these tests need the real API server; run `make api-test`");
    assert!(
        Path::new(&kc).exists(),
        "KUBECONFIG={kc} does not exist; run `make cluster-up`"
    );
    Client::try_default()
        .await
        .expect("cannot build a client from KUBECONFIG")
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("bpfpoly-test").force();
    for crd in bpfpoly_crds::crds() {
        let name = crd.name_any();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(std::time::Duration::from_secs(20), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established within 20 s"))
            .unwrap();
    }
}

fn samples() -> Vec<(PathBuf, BpfPolyProgram)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("crds/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let obj: BpfPolyProgram =
                serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            (f, obj)
        })
        .collect()
}

/// Distinct object names per test so tests can run in parallel on one server.
fn renamed(mut obj: BpfPolyProgram, suffix: &str) -> BpfPolyProgram {
    obj.metadata.name = Some(format!("{}-{suffix}", obj.name_any()));
    obj
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn generated_crds_apply_and_samples_round_trip() {
    let client = client().await;
    install_crds(&client).await;
    let api: Api<BpfPolyProgram> = Api::all(client.clone());
    let samples = samples();
    assert!(samples.len() >= 4);
    for (file, obj) in samples {
        let obj = renamed(obj, "rt");
        let name = obj.name_any();
        let _ = api.delete(&name, &DeleteParams::default()).await;
        wait_gone(&api, &name).await;
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{}: create: {e}", file.display()));
        let read = api.get(&name).await.unwrap();
        assert_eq!(
            read.spec,
            obj.spec,
            "{}: spec read back differs",
            file.display()
        );
        assert_eq!(created.spec, obj.spec);
        api.delete(&name, &DeleteParams::default()).await.unwrap();
    }
}

async fn wait_gone(api: &Api<BpfPolyProgram>, name: &str) {
    for _ in 0..50 {
        if api.get_opt(name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{name} still present");
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn schema_rejects_what_kubernetes_1_20_can_enforce() {
    let client = client().await;
    install_crds(&client).await;
    let api: Api<BpfPolyProgram> = Api::all(client.clone());
    let (_, base) = samples()
        .into_iter()
        .find(|(f, _)| f.ends_with("exec-tracer.yaml"))
        .unwrap();
    // Kubernetes 1.20 names list items without their index.
    let cases: Vec<(&str, serde_json::Value)> = vec![
        (
            "spec.variants.name",
            serde_json::json!({"name": "Bad_Name"}),
        ),
        (
            "spec.variants.bytecode.sha256",
            serde_json::json!({"bytecode": {"path": "/x.o", "sha256": "xyz"}}),
        ),
    ];
    for (i, (field, patch)) in cases.into_iter().enumerate() {
        let mut v = serde_json::to_value(renamed(base.clone(), &format!("schema{i}"))).unwrap();
        let variant = v["spec"]["variants"][0].as_object_mut().unwrap();
        for (k, val) in patch.as_object().unwrap() {
            variant.insert(k.clone(), val.clone());
        }
        let obj: BpfPolyProgram = serde_json::from_value(v).unwrap();
        let err = api
            .create(&PostParams::default(), &obj)
            .await
            .expect_err(field);
        let msg = err.to_string();
        assert!(
            msg.contains(field),
            "rejection of {field} should name it: {msg}"
        );
    }
    let mut v = serde_json::to_value(renamed(base.clone(), "schema-enum")).unwrap();
    v["spec"]["fallback"] = serde_json::json!({"onVerifierReject": "Retry"});
    let raw: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<BpfPolyProgram>(&()),
    );
    let dynobj: kube::api::DynamicObject = serde_json::from_value(v).unwrap();
    let err = raw
        .create(&PostParams::default(), &dynobj)
        .await
        .expect_err("enum");
    assert!(
        err.to_string().contains("spec.fallback.onVerifierReject"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn status_subresources_take_server_side_apply() {
    let client = client().await;
    install_crds(&client).await;
    let profiles: Api<BpfNodeProfile> = Api::all(client.clone());
    let pp = PatchParams::apply("bpfpoly-test").force();
    let profile = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
        "metadata": {"name": "api-test-node"},
        "spec": {"queries": ["field:struct task_struct.loginuid"]}
    });
    profiles
        .patch("api-test-node", &pp, &Patch::Apply(&profile))
        .await
        .unwrap();
    let status = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
        "status": {"kernel": {"release": "6.1.0-54-cloud-amd64", "version": "6.1.0"},
                   "btf": {"available": true, "source": "/sys/kernel/btf/vmlinux", "sha256": "ab", "types": 95086},
                   "answers": {"field:struct task_struct.loginuid": true}}
    });
    profiles
        .patch_status("api-test-node", &pp, &Patch::Apply(&status))
        .await
        .unwrap();
    let read = profiles.get("api-test-node").await.unwrap();
    let st = read.status.unwrap();
    assert_eq!(st.kernel.release, "6.1.0-54-cloud-amd64");
    assert_eq!(
        st.answers.get("field:struct task_struct.loginuid"),
        Some(&true)
    );
    assert_eq!(read.spec.queries, ["field:struct task_struct.loginuid"]);

    let states: Api<BpfNodeState> = Api::all(client.clone());
    let state = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState",
        "metadata": {"name": "api-test-node"}, "spec": {"programs": []}
    });
    states
        .patch("api-test-node", &pp, &Patch::Apply(&state))
        .await
        .unwrap();
    let st = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState",
        "status": {"programs": [{"name": "p", "observedGeneration": 1, "phase": "Degraded",
            "fallbacks": [{"from": "kprobe", "to": "tp-btf", "stage": "attach", "reason": "no kprobes"}]}],
            "summary": {"programs": 1, "loaded": 0, "degraded": 1, "failed": 0}}
    });
    states
        .patch_status("api-test-node", &pp, &Patch::Apply(&st))
        .await
        .unwrap();
    let out = kubectl(&["get", "bns", "api-test-node"]);
    let header = out.lines().next().unwrap();
    for col in ["NAME", "PROGRAMS", "LOADED", "DEGRADED", "AGE"] {
        assert!(header.contains(col), "bns column {col} missing: {out}");
    }
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()[1..4]
            == ["1", "0", "1"],
        "{out}"
    );
    let out = kubectl(&["get", "bnp", "api-test-node"]);
    for col in ["KERNEL", "BTF", "AGE"] {
        assert!(out.contains(col), "bnp column {col} missing: {out}");
    }
    assert!(
        out.contains("6.1.0-54-cloud-amd64") && out.contains("true"),
        "{out}"
    );
    profiles
        .delete("api-test-node", &DeleteParams::default())
        .await
        .unwrap();
    states
        .delete("api-test-node", &DeleteParams::default())
        .await
        .unwrap();
}

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl is not installed");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
#[ignore = "needs the real API server: run `make api-test`"]
async fn kubectl_get_bpp_shows_the_printer_columns() {
    let client = client().await;
    install_crds(&client).await;
    let api: Api<BpfPolyProgram> = Api::all(client.clone());
    let (_, obj) = samples().into_iter().next().unwrap();
    let obj = renamed(obj, "columns");
    let name = obj.name_any();
    let pp = PatchParams::apply("bpfpoly-test").force();
    api.patch(&name, &pp, &Patch::Apply(&obj)).await.unwrap();
    let status = serde_json::json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfPolyProgram",
        "status": {"nodes": {"selected": 3, "eligible": 3, "loaded": 2, "degraded": 1, "failed": 0, "unsupported": 0, "pending": 0},
                   "variantSummary": "xdp-tailcall=3",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "AllNodesRunning", "message": "3 of 3", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    });
    api.patch_status(&name, &pp, &Patch::Apply(&status))
        .await
        .unwrap();
    let out = kubectl(&["get", "bpp", &name]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "VARIANTS",
            "SELECTED",
            "LOADED",
            "DEGRADED",
            "UNSUPPORTED",
            "READY",
            "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..7],
        [name.as_str(), "xdp-tailcall=3", "3", "2", "1", "0", "True"],
        "{out}"
    );
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}
