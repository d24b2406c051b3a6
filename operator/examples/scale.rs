//! Operator at scale, on the real kube-apiserver with **SIMULATED NODES**: Node objects and
//! BpfNodeProfile statuses written by this program. There are no agents and no kernels, and
//! nothing renews the agents' liveness Leases, so the operator is started with
//! `--node-lost-after 0` (liveness tracking off). Without it every node is "lost" 20 s after
//! the start and reconcile storms follow (5,000 nodes took 136-149 s that way, 34 s without).
//!
//! `scale NODES PROGRAMS [OPERATOR]`, in order, on one API server:
//! 1. creates NODES nodes on three kernel builds (three BTF digests) and answers the queries
//!    on one node per build (as agents would);
//! 2. **the floor**: a minimal client writes one BpfNodeState per node (`floor-node-*`, a
//!    spec of the shape and about the size the operator writes) by server-side apply, with
//!    the operator writer's concurrency (32), and is timed; its objects are then deleted,
//!    before the operator starts (the operator would sweep them: they name no Node);
//! 3. applies PROGRAMS programs, starts `bpfpoly-operator run --node-lost-after 0` and
//!    measures the time until every node state carries every program, the operator's peak
//!    RSS, and from the API server's /metrics (before and after): requests
//!    (`apiserver_request_total`), node-state writes (its POST/PUT/PATCH/APPLY of
//!    `bpfnodestates`, status excluded) and the server's CPU (`process_cpu_seconds_total`);
//! 4. measures the node states' size: the compact JSON of each converged state's `spec`.
//!
//! Prints one JSON line (convergence as a ratio to the floor, bytes, writes and API server
//! CPU per node).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

/// Concurrency of this program's own setup writes.
const SETUP_CONCURRENCY: usize = 48;
/// The operator's node writer writes this many nodes at once (operator/src/writer.rs): the
/// floor client uses the same.
const WRITER_CONCURRENCY: usize = 32;
/// Give up on convergence after this long.
const CONVERGE_CAP: Duration = Duration::from_secs(900);
/// After convergence, late node-state writes are still counted for this long.
const SETTLE: Duration = Duration::from_secs(2);
const NODE_PREFIX: &str = "scale-node-";
const FLOOR_PREFIX: &str = "floor-node-";
const FLOOR_LABEL: &str = "bpfpoly.io/scale-floor";

struct Args {
    nodes: usize,
    programs: usize,
    operator: String,
}

fn args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    Args {
        nodes: args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500),
        programs: args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20),
        operator: args
            .get(3)
            .cloned()
            .unwrap_or_else(|| "target/release/bpfpoly-operator".into()),
    }
}

fn program(i: usize) -> Value {
    let mut v: Value =
        serde_yaml::from_str(include_str!("../../crds/examples/exec-tracer.yaml")).unwrap();
    v["metadata"] = json!({"name": format!("scale-{i:02}")});
    v["spec"]["nodeSelector"] = json!({"matchLabels": {"bpfpoly.io/scale": "true"}});
    v["spec"]["rollout"] =
        json!({"maxUnavailable": "100%", "canary": 0, "pauseOnDegradedRatio": 1.0});
    v
}

// ---------------------------------------------------------------------------
// The API server's own figures
// ---------------------------------------------------------------------------

/// One reading of the API server's /metrics.
#[derive(Clone, Copy, Default)]
struct ApiServerReading {
    requests: f64,
    node_state_writes: f64,
    cpu_seconds: Option<f64>,
}

impl ApiServerReading {
    async fn take(client: &Client) -> Self {
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = client.request_text(req).await.unwrap();
        let value = |l: &str| l.rsplit(' ').next()?.parse::<f64>().ok();
        let mut r = Self::default();
        for l in text.lines() {
            if l.starts_with("apiserver_request_total{") {
                let v = value(l).unwrap_or(0.0);
                r.requests += v;
                if is_node_state_write(l) {
                    r.node_state_writes += v;
                }
            } else if l.starts_with("process_cpu_seconds_total ") {
                r.cpu_seconds = value(l);
            }
        }
        r
    }

    /// What happened between `self` and `later`.
    fn delta(&self, later: &Self) -> Self {
        Self {
            requests: later.requests - self.requests,
            node_state_writes: later.node_state_writes - self.node_state_writes,
            cpu_seconds: later.cpu_seconds.zip(self.cpu_seconds).map(|(b, a)| b - a),
        }
    }
}

/// A write of a BpfNodeState's spec: POST, PUT, PATCH or APPLY of `bpfnodestates`, not of a
/// subresource (status is the agents').
fn is_node_state_write(series: &str) -> bool {
    series.contains("resource=\"bpfnodestates\"")
        && series.contains("subresource=\"\"")
        && ["POST", "PUT", "PATCH", "APPLY", "CREATE", "UPDATE"]
            .iter()
            .any(|v| series.contains(&format!("verb=\"{v}\"")))
}

// ---------------------------------------------------------------------------
// Setup and cleanup of the simulated nodes
// ---------------------------------------------------------------------------

async fn create_nodes(client: &Client, nodes_n: usize) {
    let queries: Vec<String> = bpfpoly_crds::select::program_queries(
        &serde_json::from_value::<BpfPolyProgram>(program(0))
            .unwrap()
            .spec,
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    eprintln!("[scale] creating {nodes_n} simulated nodes on 3 kernel builds");
    futures::stream::iter(0..nodes_n)
        .map(|i| create_node(client.clone(), i, &queries))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
}

/// One simulated node: its Node, its BpfNodeProfile, and the profile's status as its agent
/// would write it.
async fn create_node(client: Client, i: usize, queries: &[String]) -> Result<(), kube::Error> {
    let name = format!("{NODE_PREFIX}{i:05}");
    let pp = PatchParams::apply("scale-sim").force();
    let nodes: Api<Node> = Api::all(client.clone());
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
        "labels": {"bpfpoly.io/scale": "true", "bpfpoly.io/simulated": "true"}}});
    nodes.patch(&name, &pp, &Patch::Apply(node)).await?;
    let profiles: Api<BpfNodeProfile> = Api::all(client);
    let profile = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
        "metadata": {"name": name}, "spec": {}});
    profiles.patch(&name, &pp, &Patch::Apply(profile)).await?;
    // The first node of each build has answered (as its agent would).
    let answers: BTreeMap<&String, bool> = if i < 3 {
        queries
            .iter()
            .map(|q| (q, i != 2 || !q.contains("loginuid")))
            .collect()
    } else {
        BTreeMap::new()
    };
    let release = ["6.1.0-56-cloud-amd64", "6.6.0-1-amd64", "5.15.0-1051-azure"][i % 3];
    let status = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "status": {
        "kernel": {"release": release, "version": release.split('-').next().unwrap()},
        "btf": {"available": true, "source": "simulated", "sha256": format!("build-{}", i % 3), "types": 100000},
        "programTypes": ["kprobe", "tracepoint", "tracing"], "mapTypes": ["ringbuf"], "answers": answers}});
    // Written as the node's own agent would (the operator ignores other writers).
    let agent = PatchParams::apply(&bpfpoly_crds::state::agent_field_manager(&name)).force();
    profiles
        .patch_status(&name, &agent, &Patch::Apply(status))
        .await?;
    Ok(())
}

async fn apply_programs(client: &Client, programs_n: usize) {
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
}

/// Deletes `names` of `K`, many at once.
async fn delete_each<K>(api: &Api<K>, names: Vec<String>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(names)
        .for_each_concurrent(SETUP_CONCURRENCY, |n| async move {
            let _ = api.delete(&n, &DeleteParams::default()).await;
        })
        .await;
}

/// Names of every `K` starting with `prefix`.
async fn names_with_prefix<K>(api: &Api<K>, prefix: &str) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api.list_metadata(&ListParams::default()).await;
    list.map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Removes the benchmark's own objects only: the cluster may be shared with `make run`.
async fn clean(client: &Client) {
    let lp = ListParams::default().labels("bpfpoly.io/scale=true");
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete_collection(&DeleteParams::default(), &lp).await;
    let bpp: Api<BpfPolyProgram> = Api::all(client.clone());
    let unfinalize = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    for name in names_with_prefix(&bpp, "scale-").await {
        let _ = bpp.patch(&name, &PatchParams::default(), &unfinalize).await;
        let _ = bpp.delete(&name, &DeleteParams::default()).await;
    }
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let profiles: Api<BpfNodeProfile> = Api::all(client.clone());
    delete_each(&states, names_with_prefix(&states, NODE_PREFIX).await).await;
    delete_each(&states, names_with_prefix(&states, FLOOR_PREFIX).await).await;
    delete_each(&profiles, names_with_prefix(&profiles, NODE_PREFIX).await).await;
}

// ---------------------------------------------------------------------------
// The floor: a minimal client writing one node object per node
// ---------------------------------------------------------------------------

/// A node-state spec of the shape and size the operator writes for these programs on node
/// `i`: every program with its candidate variants in order and, on the third kernel build
/// (no `task_struct.loginuid`), the `read_loginuid` fallback with its reason, stored once
/// for the programs it applies to.
fn floor_spec(programs_n: usize, i: usize) -> Value {
    let names: Vec<String> = (0..programs_n).map(|p| format!("scale-{p:02}")).collect();
    let programs: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({"name": name, "generation": 1,
                "variants": ["kprobe", "tp-btf", "tracepoint"]})
        })
        .collect();
    let mut spec = json!({"programs": programs});
    if i % 3 == 2 {
        spec["configFallbacks"] = json!([{"name": "read_loginuid",
            "reason": "field struct task_struct.loginuid missing on this kernel",
            "programs": names}]);
    }
    spec
}

struct Floor {
    seconds: f64,
    spec_bytes_mean: f64,
    api: ApiServerReading,
    cleanup_seconds: f64,
}

/// Times `nodes_n` server-side applies of a BpfNodeState (`floor-node-*`), WRITER_CONCURRENCY
/// at once, then deletes them all.
async fn floor(client: &Client, nodes_n: usize, programs_n: usize) -> Floor {
    let spec_bytes = |i| {
        serde_json::to_vec(&floor_spec(programs_n, i))
            .unwrap()
            .len()
    };
    let spec_bytes_mean = (0..nodes_n).map(spec_bytes).sum::<usize>() as f64 / nodes_n as f64;
    eprintln!("[scale] floor: {nodes_n} node states of {spec_bytes_mean:.0} spec bytes (mean), {WRITER_CONCURRENCY} at once");
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let before = ApiServerReading::take(client).await;
    let start = Instant::now();
    futures::stream::iter(0..nodes_n)
        .map(|i| {
            let (states, spec) = (states.clone(), floor_spec(programs_n, i));
            async move {
                let name = format!("{FLOOR_PREFIX}{i:05}");
                let obj = json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState",
                    "metadata": {"name": name, "labels": {FLOOR_LABEL: "true"}}, "spec": spec});
                let pp = PatchParams::apply("scale-floor").force();
                states.patch(&name, &pp, &Patch::Apply(obj)).await
            }
        })
        .buffer_unordered(WRITER_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let api = before.delta(&ApiServerReading::take(client).await);
    let cleanup = Instant::now();
    delete_each(&states, names_with_prefix(&states, FLOOR_PREFIX).await).await;
    assert!(
        names_with_prefix(&states, FLOOR_PREFIX).await.is_empty(),
        "floor node states left"
    );
    Floor {
        seconds,
        spec_bytes_mean,
        api,
        cleanup_seconds: cleanup.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------
// The operator's run
// ---------------------------------------------------------------------------

struct OperatorRun {
    converged: bool,
    seconds: f64,
    peak_rss_kib: u64,
    /// From the operator's start to convergence.
    api: ApiServerReading,
    /// Node-state writes from the operator's start to SETTLE after convergence.
    node_state_writes: f64,
    operator_node_writes: Option<f64>,
}

fn start_operator(operator: &str, metrics_addr: std::net::SocketAddr) -> Child {
    Command::new(operator)
        .args([
            "run",
            "--no-leader-election",
            // SIMULATED nodes: no agent renews a liveness Lease (see the module comment).
            "--node-lost-after",
            "0",
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
        .expect("cannot start the operator (build it with cargo build --release)")
}

async fn run_operator(client: &Client, args: &Args) -> OperatorRun {
    // A free port for the operator's /metrics (the benchmark may run beside other stacks).
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("no free local port");
    let before = ApiServerReading::take(client).await;
    let start = Instant::now();
    let mut child = start_operator(&args.operator, metrics_addr);
    let pid = child.id();
    let (converged, peak) = wait_converged(client, args, pid, start).await;
    let seconds = start.elapsed().as_secs_f64();
    let at_convergence = ApiServerReading::take(client).await;
    tokio::time::sleep(SETTLE).await;
    let settled = ApiServerReading::take(client).await;
    let operator_node_writes = operator_metric(metrics_addr, "bpfpoly_node_writes_total");
    let peak_rss_kib = peak.max(peak_rss_kib(pid));
    let _ = child.kill();
    let _ = child.wait();
    // bench.sh reads this line: from here on the operator is gone on purpose.
    eprintln!("[scale] operator stopped after {seconds:.1}s; measuring the node states");
    OperatorRun {
        converged,
        seconds,
        peak_rss_kib,
        api: before.delta(&at_convergence),
        node_state_writes: before.delta(&settled).node_state_writes,
        operator_node_writes,
    }
}

/// Watches the node states until every simulated node carries every program (true) or
/// CONVERGE_CAP passes (false); samples the operator's peak RSS meanwhile. Watched, not
/// polled: each change arrives once (a LIST poll of every state would load the API server
/// more than the operator does).
async fn wait_converged(client: &Client, args: &Args, pid: u32, start: Instant) -> (bool, u64) {
    use kube::runtime::watcher::{watcher, Config, Event};
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let mut events = std::pin::pin!(watcher(states, Config::default()));
    let mut done: HashSet<String> = HashSet::new();
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                peak = peak.max(peak_rss_kib(pid));
                if start.elapsed() > CONVERGE_CAP {
                    eprintln!("[scale] not converged after {} s: {}/{}", CONVERGE_CAP.as_secs(), done.len(), args.nodes);
                    return (false, peak);
                }
                if last_report.elapsed() > Duration::from_secs(10) {
                    eprintln!("[scale] {:.0}s: {}/{} node states carry all {} programs",
                        start.elapsed().as_secs_f64(), done.len(), args.nodes, args.programs);
                    last_report = Instant::now();
                }
            }
            ev = events.next() => {
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
                note_state(&mut done, &s, args.programs);
                if done.len() == args.nodes {
                    return (true, peak);
                }
            }
        }
    }
}

/// Counts a simulated node's state as done when it carries all `programs_n` programs.
fn note_state(done: &mut HashSet<String>, s: &BpfNodeState, programs_n: usize) {
    let name = s.metadata.name.clone().unwrap_or_default();
    if !name.starts_with(NODE_PREFIX) {
        return;
    }
    // Other programs (e.g. `make run`'s samples) may select these nodes too.
    let carried = s
        .spec
        .programs
        .iter()
        .filter(|a| a.name.starts_with("scale-"))
        .count();
    if carried == programs_n {
        done.insert(name);
    } else {
        done.remove(&name);
    }
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

// ---------------------------------------------------------------------------
// Node-state size and the report
// ---------------------------------------------------------------------------

/// Compact JSON bytes of each simulated node's BpfNodeState: (spec mean, spec max, whole
/// object mean, as the API server returns it, managedFields included).
async fn node_state_bytes(client: &Client) -> (f64, usize, f64) {
    let states: Api<BpfNodeState> = Api::all(client.clone());
    let (mut spec, mut max, mut whole, mut n) = (0usize, 0usize, 0usize, 0usize);
    let mut shapes: BTreeMap<usize, String> = BTreeMap::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = states.list(&lp).await.unwrap();
        for s in page.items.iter().filter(|s| {
            s.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(NODE_PREFIX))
        }) {
            let json = serde_json::to_string(&s.spec).unwrap();
            let b = json.len();
            shapes.entry(b).or_insert(json);
            (spec, max, n) = (spec + b, max.max(b), n + 1);
            whole += serde_json::to_vec(s).unwrap().len();
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    for (b, json) in shapes
        .iter()
        .take(1)
        .chain(shapes.iter().skip(1).next_back())
    {
        eprintln!("[scale] a node-state spec of {b} bytes: {json}");
    }
    let n = n.max(1) as f64;
    (spec as f64 / n, max, whole as f64 / n)
}

fn report(args: &Args, floor: &Floor, run: &OperatorRun, bytes: (f64, usize, f64)) -> Value {
    let n = args.nodes as f64;
    let per_node = |x: Option<f64>| x.map(|x| x / n);
    json!({"nodes": args.nodes, "programs": args.programs,
        "simulated_nodes": true,
        "operator_flags": "run --no-leader-election --node-lost-after 0 (SIMULATED nodes: no agent renews a liveness Lease)",
        "converged": run.converged, "converge_seconds": run.seconds,
        "peak_rss_mib": run.peak_rss_kib as f64 / 1024.0,
        "api_requests": run.api.requests,
        "operator_node_writes": run.operator_node_writes,
        "node_state_writes": run.node_state_writes,
        "node_state_writes_per_node": run.node_state_writes / n,
        "node_state_spec_bytes_mean": bytes.0, "node_state_spec_bytes_max": bytes.1,
        "node_state_object_bytes_mean": bytes.2,
        "node_state_bytes_measured": "compact JSON of each converged BpfNodeState's spec (object: the whole object as served, managedFields included)",
        "apiserver_cpu_seconds": run.api.cpu_seconds,
        "apiserver_cpu_ms_per_node": per_node(run.api.cpu_seconds).map(|s| s * 1e3),
        "floor_seconds": floor.seconds,
        "floor_spec_bytes_mean": floor.spec_bytes_mean,
        "floor_concurrency": WRITER_CONCURRENCY,
        "floor_node_state_writes": floor.api.node_state_writes,
        "floor_apiserver_cpu_ms_per_node": per_node(floor.api.cpu_seconds).map(|s| s * 1e3),
        "floor_cleanup_seconds": floor.cleanup_seconds,
        "ratio_to_floor": run.seconds / floor.seconds,
        "note": "SIMULATED nodes (Node objects + profiles written by the benchmark, no agents); \
                 the floor is a minimal client applying one BpfNodeState per node on the same \
                 API server just before; api_requests includes the benchmark's own watch"})
}

#[tokio::main]
async fn main() {
    let args = args();
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at the local API server");
    clean(&client).await;
    let setup = Instant::now();
    create_nodes(&client, args.nodes).await;
    let floor = floor(&client, args.nodes, args.programs).await;
    eprintln!(
        "[scale] floor: {:.1}s ({:.1}s to delete); applying {} programs",
        floor.seconds, floor.cleanup_seconds, args.programs
    );
    apply_programs(&client, args.programs).await;
    eprintln!(
        "[scale] setup took {:.1}s; starting the operator",
        setup.elapsed().as_secs_f64()
    );
    let run = run_operator(&client, &args).await;
    let bytes = node_state_bytes(&client).await;
    println!("{}", report(&args, &floor, &run, bytes));
    clean(&client).await;
}
