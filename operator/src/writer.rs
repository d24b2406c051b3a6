//! Writes each node's `BpfNodeState.spec` and `BpfNodeProfile.spec.queries`: one
//! server-side apply per node that changed, however many programs changed with it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bpfpoly_crds::state::{AssignedProgram, BpfNodeStateSpec};
use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use tokio::sync::Notify;

use crate::context::Context;
use crate::written;
use crate::FIELD_MANAGER;

/// Nodes written concurrently.
const CONCURRENCY: usize = 32;

/// Runs forever: writes dirty nodes, retrying failures after a pause.
pub async fn run(ctx: Arc<Context>) {
    initial_sync(&ctx).await;
    loop {
        ctx.dirty.wake.notified().await;
        settle(&ctx).await;
        let batch = ctx.dirty.take();
        let failed: Vec<String> = futures::stream::iter(batch)
            .map(|node| {
                let ctx = ctx.clone();
                async move {
                    match write_node(&ctx, &node).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "cannot write node state");
                            ctx.metrics
                                .reconcile_errors
                                .with_label_values(&["node_write"])
                                .inc();
                            Some(node)
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        if !failed.is_empty() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                ctx.dirty.mark(failed);
            });
        }
    }
}

/// Until every program has been reconciled once (or 10 s passed), writing a node would
/// write it again for each program that follows: wait, so a start writes each node once.
/// The programs to wait for come from one LIST, not from the controller's cache: an empty
/// cache right after start would look like "every program reconciled".
async fn initial_sync(ctx: &Context) {
    let started = std::time::Instant::now();
    let api: Api<BpfPolyProgram> = Api::all(ctx.client.clone());
    let expected: Vec<String> = match api.list_metadata(&Default::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list programs; the first node writes may repeat");
            Vec::new()
        }
    };
    loop {
        let pending = {
            let targets = ctx
                .targets
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let cached: BTreeSet<String> = ctx
                .programs
                .state()
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect();
            // Listed programs, unless the filled cache says they are gone since, and any
            // program created since.
            let listed = expected
                .iter()
                .filter(|n| cached.is_empty() || cached.contains(*n));
            listed
                .chain(cached.iter())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|n| !targets.contains_key(*n))
                .count()
        };
        if pending == 0 || started.elapsed() > Duration::from_secs(10) {
            tracing::debug!(
                programs = expected.len(),
                waited_ms = started.elapsed().as_millis() as u64,
                "first node write pass"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lets a burst of reconciles (many programs changing at once) settle into one pass: waits
/// until nothing was marked for 100 ms, at most 1 s.
async fn settle(ctx: &Context) {
    let started = std::time::Instant::now();
    let mut last = u64::MAX;
    loop {
        let n = ctx.dirty.marks.load(std::sync::atomic::Ordering::Relaxed);
        if n == last || started.elapsed() > Duration::from_secs(1) {
            return;
        }
        last = n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a node should hold, from the published targets and what it holds now.
fn desired_programs(
    ctx: &Context,
    node: &str,
    current: &[Arc<AssignedProgram>],
) -> Vec<Arc<AssignedProgram>> {
    let targets = ctx
        .targets
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out: Vec<Arc<AssignedProgram>> = Vec::new();
    for (program, t) in targets.iter() {
        if let Some(a) = t.assignments.get(node) {
            out.push(a.clone());
        } else if t.keep.contains(node) {
            // The rollout has not reached this node: it keeps its version (if any).
            out.extend(current.iter().filter(|a| &a.name == program).cloned());
        }
    }
    // Programs not reconciled yet (e.g. right after a restart) keep what they have, unless
    // the program is gone.
    for a in current {
        if !targets.contains_key(&a.name)
            && ctx
                .programs
                .get(&ObjectRef::new(&a.name))
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        {
            out.push(a.clone());
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn desired_queries(ctx: &Context, node: &str) -> Vec<String> {
    let targets = ctx
        .targets
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let set: BTreeSet<&String> = targets
        .values()
        .filter(|t| t.query_nodes.contains(node))
        .flat_map(|t| t.queries.iter())
        .collect();
    set.into_iter().cloned().collect()
}

/// The operator's server-side apply of `spec` to the node's `K` (named as the node); one
/// node write in the metrics. Not written (false) when this writer has just written the same
/// spec and the cached object (`cached`) only lags that write.
async fn apply_spec<K>(
    ctx: &Context,
    node: &str,
    spec: serde_json::Value,
    cached: Option<&ObjectMeta>,
) -> Result<bool, kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let digest = written::digest(&spec);
    if ctx.written.lagging(&kind, node, digest, cached) {
        return Ok(false);
    }
    let api: Api<K> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": node},
        "spec": spec,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let done = api.patch(node, &pp, &Patch::Apply(&patch)).await?;
    ctx.metrics.node_writes.inc();
    ctx.written.note(&kind, node, digest, done.meta());
    Ok(true)
}

async fn write_node(ctx: &Context, node: &str) -> Result<(), kube::Error> {
    if ctx.nodes.get(&ObjectRef::new(node)).is_none() {
        return Ok(()); // deleted; the sweep removes what is left
    }
    let state = ctx.states.get(&ObjectRef::new(node));
    let current = state
        .as_ref()
        .map(|s| s.spec.programs.clone())
        .unwrap_or_default();
    let want = desired_programs(ctx, node, &current);
    if want != current || (state.is_none() && !want.is_empty()) {
        // The stored form: each fallback once per node (see `BpfNodeStateSpec`).
        let spec = BpfNodeStateSpec {
            programs: want.clone(),
        };
        let spec = serde_json::to_value(&spec).map_err(kube::Error::SerdeError)?;
        let meta = state.as_ref().map(|s| &s.metadata);
        if apply_spec::<BpfNodeState>(ctx, node, spec, meta).await? {
            tracing::debug!(%node, programs = want.len(), "wrote node state");
        }
    }
    let profile = ctx.profiles.get(&ObjectRef::new(node));
    let have = profile
        .as_ref()
        .map(|p| p.spec.queries.clone())
        .unwrap_or_default();
    let queries = desired_queries(ctx, node);
    if queries != have {
        let spec = serde_json::json!({"queries": queries});
        let meta = profile.as_ref().map(|p| &p.metadata);
        if apply_spec::<BpfNodeProfile>(ctx, node, spec, meta).await? {
            tracing::debug!(%node, queries = queries.len(), "wrote node queries");
        }
    }
    Ok(())
}

/// Sweeps when the caches change, coalesced to at most once a second. Comparing the caches
/// (rather than acting on Delete events, which a restarted watch can miss) also cleans up a
/// node deleted while the operator was down.
pub async fn sweep_on_change(ctx: Arc<Context>, changed: Arc<Notify>) {
    let mut last = (usize::MAX, usize::MAX, usize::MAX);
    loop {
        let now = (
            ctx.nodes.state().len(),
            ctx.states.state().len(),
            ctx.profiles.state().len(),
        );
        if now != last {
            sweep_deleted_nodes(&ctx).await;
            last = now;
        }
        changed.notified().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the states and profiles of nodes that no longer exist.
pub async fn sweep_deleted_nodes(ctx: &Context) {
    let nodes: BTreeSet<String> = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
    let gone = |names: Vec<String>| -> Vec<String> {
        names.into_iter().filter(|n| !nodes.contains(n)).collect()
    };
    let states = gone(ctx.states.state().iter().map(|s| s.name_any()).collect());
    let profiles = gone(ctx.profiles.state().iter().map(|p| p.name_any()).collect());
    delete_all::<BpfNodeState>(ctx, states).await;
    delete_all::<BpfNodeProfile>(ctx, profiles).await;
}

/// Deletes each named `K`, logging what was removed and what could not be.
async fn delete_all<K>(ctx: &Context, names: Vec<String>)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(ctx.client.clone());
    let kind = K::kind(&());
    for name in names {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(node = %name, "node deleted: removed its {kind}"),
            Err(e) => tracing::warn!(node = %name, error = %e, "cannot remove {kind}"),
        }
    }
}
