//! Operator at scale, on the real kube-apiserver with **simulated nodes** (Node objects and
//! BpfNodeProfile statuses written by this program; no agents, no kernel).
//!
//! `scale NODES PROGRAMS` creates NODES nodes on three kernel builds (three BTF digests),
//! answers the queries on one node per build (as agents would), applies PROGRAMS programs,
//! starts `bpfpoly-operator run` and measures the time until every node state carries every
//! program, the operator's peak RSS, and the API requests made (`apiserver_request_total`
//! from the server's /metrics, before and after). Prints one JSON line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;

const CONCURRENCY: usize = 48;

async fn api_requests(client: &Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn program(i: usize) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_yaml::from_str(include_str!("../../crds/examples/exec-tracer.yaml")).unwrap();
    v["metadata"] = json!({"name": format!("scale-{i:02}")});
    v["spec"]["nodeSelector"] = json!({"matchLabels": {"bpfpoly.io/scale": "true"}});
    v["spec"]["rollout"] =
        json!({"maxUnavailable": "100%", "canary": 0, "pauseOnDegradedRatio": 1.0});
    v
}

async fn clean(client: &Client) {
    let lp = ListParams::default().labels("bpfpoly.io/scale=true");
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete_collection(&DeleteParams::default(), &lp).await;
    let bpp: Api<BpfPolyProgram> = Api::all(client.clone());
    for p in bpp.list(&ListParams::default()).await.unwrap().items {
        let name = p.metadata.name.unwrap_or_default();
        if name.starts_with("scale-") {
            let _ = bpp
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
            let _ = bpp.delete(&name, &DeleteParams::default()).await;
        }
    }
    // Only the benchmark's own nodes' objects: the cluster may be shared with `make run`.
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let profiles: Api<BpfNodeProfile> = Api::all(client.clone());
    let mut names: Vec<String> = Vec::new();
    if let Ok(l) = profiles.list(&ListParams::default()).await {
        names.extend(l.items.into_iter().filter_map(|p| p.metadata.name));
    }
    if let Ok(l) = states.list(&ListParams::default()).await {
        names.extend(l.items.into_iter().filter_map(|p| p.metadata.name));
    }
    names.sort();
    names.dedup();
    futures::stream::iter(names.into_iter().filter(|n| n.starts_with("scale-node-")))
        .for_each_concurrent(CONCURRENCY, |n| {
            let (states, profiles) = (states.clone(), profiles.clone());
            async move {
                let _ = states.delete(&n, &DeleteParams::default()).await;
                let _ = profiles.delete(&n, &DeleteParams::default()).await;
            }
        })
        .await;
}

/// One unlabelled series from the operator's /metrics (None when it cannot be read).
fn operator_metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nodes_n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let programs_n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let operator = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "target/release/bpfpoly-operator".into());
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at the local API server");
    clean(&client).await;

    let queries: Vec<String> = bpfpoly_crds::select::program_queries(
        &serde_json::from_value::<BpfPolyProgram>(program(0))
            .unwrap()
            .spec,
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    eprintln!("[scale] creating {nodes_n} simulated nodes on 3 kernel builds");
    let setup = Instant::now();
    futures::stream::iter(0..nodes_n)
        .map(|i| {
            let client = client.clone();
            let queries = queries.clone();
            async move {
                let name = format!("scale-node-{i:05}");
                let pp = PatchParams::apply("scale-sim").force();
                let nodes: Api<Node> = Api::all(client.clone());
                nodes
                    .patch(&name, &pp, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": {"bpfpoly.io/scale": "true", "bpfpoly.io/simulated": "true"}}})))
                    .await?;
                let profiles: Api<BpfNodeProfile> = Api::all(client);
                profiles
                    .patch(&name, &pp, &Patch::Apply(json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
                        "metadata": {"name": name}, "spec": {}})))
                    .await?;
                // The first node of each build has answered (as its agent would).
                let answers: BTreeMap<&String, bool> =
                    if i < 3 { queries.iter().map(|q| (q, i != 2 || !q.contains("loginuid"))).collect() } else { BTreeMap::new() };
                let release = ["6.1.0-56-cloud-amd64", "6.6.0-1-amd64", "5.15.0-1051-azure"][i % 3];
                let status = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "status": {
                    "kernel": {"release": release, "version": release.split('-').next().unwrap()},
                    "btf": {"available": true, "source": "simulated", "sha256": format!("build-{}", i % 3), "types": 100000},
                    "programTypes": ["kprobe", "tracepoint", "tracing"], "mapTypes": ["ringbuf"], "answers": answers}});
                // Written as the node's own agent would (the operator ignores other writers).
                let agent = PatchParams::apply(&bpfpoly_crds::state::agent_field_manager(&name)).force();
                profiles.patch_status(&name, &agent, &Patch::Apply(status)).await?;
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let bpp: Api<BpfPolyProgram> = Api::all(client.clone());
    for i in 0..programs_n {
        bpp.patch(
            &format!("scale-{i:02}"),
            &PatchParams::apply("scale-sim").force(),
            &Patch::Apply(program(i)),
        )
        .await
        .unwrap();
    }
    eprintln!(
        "[scale] setup took {:.1}s; starting the operator",
        setup.elapsed().as_secs_f64()
    );

    // A free port for the operator's /metrics (the benchmark may run beside other stacks).
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("no free local port");
    // Watch the node states from before the operator starts: each change arrives once (a
    // LIST poll of every state would load the API server more than the operator does).
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let mut events = std::pin::pin!(kube::runtime::watcher(
        states,
        kube::runtime::watcher::Config::default()
    ));
    let mut done: std::collections::HashSet<String> = Default::default();
    let before = api_requests(&client).await;
    let start = Instant::now();
    let mut child = Command::new(&operator)
        .args([
            "run",
            "--no-leader-election",
            "--metrics-addr",
            &metrics_addr.to_string(),
        ])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(
            std::fs::File::create(std::env::temp_dir().join("bpfpoly-scale-operator.log"))
                .map_or(Stdio::null(), Stdio::from),
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start the operator (build it with cargo build --release)");
    let pid = child.id();
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_report = Instant::now();
    let converged = loop {
        tokio::select! {
            _ = tick.tick() => {
                peak = peak.max(peak_rss_kib(pid));
                if start.elapsed() > Duration::from_secs(600) {
                    eprintln!("[scale] not converged after 600 s: {}/{nodes_n}", done.len());
                    break start.elapsed();
                }
                if last_report.elapsed() > Duration::from_secs(10) {
                    eprintln!("[scale] {:.0}s: {}/{nodes_n} node states carry all {programs_n} programs",
                        start.elapsed().as_secs_f64(), done.len());
                    last_report = Instant::now();
                }
            }
            ev = events.next() => {
                use kube::runtime::watcher::Event;
                let s = match ev {
                    Some(Ok(Event::Apply(s) | Event::InitApply(s))) => s,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        eprintln!("[scale] watch error (retrying): {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    None => panic!("the node-state watch ended"),
                };
                let name = s.metadata.name.clone().unwrap_or_default();
                if !name.starts_with("scale-node-") {
                    continue;
                }
                // Other programs (e.g. `make run`'s samples) may select these nodes too.
                let carried = s.spec.programs.iter().filter(|a| a.name.starts_with("scale-")).count();
                if carried == programs_n {
                    done.insert(name);
                } else {
                    done.remove(&name);
                }
                if done.len() == nodes_n {
                    break start.elapsed();
                }
            }
        }
    };
    peak = peak.max(peak_rss_kib(pid));
    let after = api_requests(&client).await;
    let node_writes = operator_metric(metrics_addr, "bpfpoly_node_writes_total");
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{}",
        json!({"nodes": nodes_n, "programs": programs_n, "converge_seconds": converged.as_secs_f64(),
               "peak_rss_mib": peak as f64 / 1024.0, "api_requests": after - before, "operator_node_writes": node_writes,
               "note": "simulated nodes (Node objects + profiles written by the benchmark); the count includes the benchmark's own watch"})
    );
    clean(&client).await;
}
