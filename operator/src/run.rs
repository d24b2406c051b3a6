//! `bpfpoly-operator run`: wiring of reflectors, leader election, the controller, the node
//! writer and the HTTP endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client};

use crate::context::Context;
use crate::controller::{error_policy, reconcile};
use crate::metrics::Metrics;
use bpfpoly_runtime::WatchBackoff;

/// Options of `run`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Kubeconfig file; in-cluster or `$KUBECONFIG` when absent.
    pub kubeconfig: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Hold a Lease before reconciling, so replicas are safe.
    pub leader_election: bool,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Lease duration; a standby takes over within it.
    pub lease_duration: Duration,
    /// This replica's identity.
    pub identity: String,
    /// How long deletion waits for the agents to unload.
    pub unload_timeout: Duration,
    /// A node whose agent Lease is not seen renewed for this long is lost (zero: off).
    pub node_lost_after: Duration,
    /// Namespace of the agents' liveness Leases.
    pub node_lease_namespace: String,
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable kubeconfig.
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// No usable kubeconfig (the message names it).
    #[error(transparent)]
    Client(#[from] bpfpoly_runtime::ClientError),
    /// The HTTP endpoint could not bind.
    #[error(transparent)]
    Bind(#[from] bpfpoly_runtime::BindError),
}

/// Starts a reflector. A change of what `fingerprint` covers (or a deletion) sends a
/// trigger; the operator's own spec writes to node states do not, so they cannot keep the
/// controller busy with itself.
/// The reflector runs on its own task.
fn reflect<K>(
    client: &Client,
    triggers: &Triggers,
    fingerprint: fn(&K) -> u64,
    quiet_when_new: Option<u64>,
    compact: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let (trigger, changed) = (triggers.all.clone(), triggers.changed.clone());
    // Objects are compacted before they are cached (see the callers).
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::steady())
        .modify(compact)
        .reflect(writer);
    let task = async move {
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let fire = match item {
                Ok(watcher::Event::Apply(o)) => {
                    let fp = fingerprint(&o);
                    match seen.insert(o.meta().name.clone().unwrap_or_default(), fp) {
                        Some(prev) => prev != fp,
                        // A node state or profile the operator itself just created carries no
                        // status yet: nothing for a program to react to (one trigger per new
                        // node made a rollout quadratic in nodes).
                        None => quiet_when_new != Some(fp),
                    }
                }
                // A (re)list fires once, at InitDone: one trigger per object would make the
                // controller reconcile all programs over and over while a large list streams
                // in (quadratic in nodes).
                Ok(watcher::Event::InitApply(o)) => {
                    seen.insert(o.meta().name.clone().unwrap_or_default(), fingerprint(&o));
                    false
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(o.meta().name.as_deref().unwrap_or_default());
                    true
                }
                Ok(watcher::Event::InitDone) => true,
                Ok(watcher::Event::Init) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "watch error; retrying");
                    false
                }
            };
            if fire {
                let _ = trigger.unbounded_send(());
                changed.notify_one();
            }
        }
    };
    tokio::spawn(task);
    reader
}

/// Where a cache change goes: `all` reconciles every program, `changed` wakes the sweep of
/// deleted nodes.
struct Triggers {
    all: futures::channel::mpsc::UnboundedSender<()>,
    changed: Arc<tokio::sync::Notify>,
}

/// Feeds every agent Lease into `liveness`; a change that matters to programs (a node first
/// seen, a new boot, a lost node renewing again, a deleted Lease) triggers all programs.
/// Plain renewals do not: they would reconcile everything every few seconds per node.
async fn watch_leases(
    api: Api<k8s_openapi::api::coordination::v1::Lease>,
    liveness: Arc<crate::liveness::Liveness>,
    trigger: futures::channel::mpsc::UnboundedSender<()>,
) {
    let config = watcher::Config::default().labels(bpfpoly_crds::state::AGENT_LEASE_LABEL);
    let stream = watcher(api, config).backoff(WatchBackoff::steady());
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let fire = match item {
            Ok(watcher::Event::Apply(l)) => liveness.observe(&l),
            Ok(watcher::Event::InitApply(l)) => {
                liveness.observe(&l);
                false
            }
            Ok(watcher::Event::Delete(l)) => {
                liveness.forget(&l);
                true
            }
            Ok(watcher::Event::InitDone) => {
                liveness.resynced();
                true
            }
            Ok(watcher::Event::Init) => false,
            Err(e) => {
                // Blind, not silent agents: the clock stops for the judgement until the
                // watch has listed again.
                liveness.blind();
                tracing::warn!(error = %e, "agent Lease watch error; retrying");
                false
            }
        };
        if fire {
            let _ = trigger.unbounded_send(());
        }
    }
}

/// Notices expiries, which no watch event announces: every second (or a twentieth of the
/// bound, if shorter), the set of lost nodes among those with a node state is recomputed,
/// and a change triggers all programs. A loss is reflected in status within the bound plus
/// this tick and one reconcile.
async fn notice_losses(
    liveness: Arc<crate::liveness::Liveness>,
    states: Store<BpfNodeState>,
    trigger: futures::channel::mpsc::UnboundedSender<()>,
) {
    if liveness.lost_after.is_zero() {
        return;
    }
    let period =
        (liveness.lost_after / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = std::collections::BTreeSet::new();
    loop {
        tick.tick().await;
        let names: Vec<String> = states
            .state()
            .iter()
            .map(|s| kube::ResourceExt::name_any(&**s))
            .collect();
        let lost = liveness.lost(names.iter().map(String::as_str));
        if lost != previous {
            for n in lost.difference(&previous) {
                tracing::warn!(node = %n, "node lost: its agent Lease was not renewed in time");
            }
            previous = lost;
            if trigger.unbounded_send(()).is_err() {
                return;
            }
        }
    }
}

/// A node-written status and who wrote it: a change of writer alone changes what is believed.
fn status_fingerprint<T: serde::Serialize>(
    status: &Option<T>,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> u64 {
    let writers: Vec<&str> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|e| e.manager.as_deref())
        .collect();
    hash_of(&(status, writers))
}

fn hash_of<T: serde::Serialize>(v: &T) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(v).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Runs until SIGTERM/SIGINT, or until leadership is lost (then exits non-zero so the
/// supervisor restarts it as a standby). Top-down: serve the endpoints, hold the lease (or
/// stand by for it), start the caches, reconcile once they are full, hand the lease back.
pub async fn run(opts: Options) -> Result<(), RunError> {
    // SIGTERM or SIGINT at any point (waiting for the lease, filling the caches, reconciling)
    // ends the run through the same path, which hands the lease back.
    let stop = shutdown_signal();
    let client = bpfpoly_runtime::client(opts.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    serve(&opts, &metrics, &ready).await?;

    let lease = if opts.leader_election {
        // A standby is healthy and ready: it only waits for the lease. (Otherwise the second
        // replica never becomes Ready and rolling updates deadlock.)
        ready.store(true, Ordering::Relaxed);
        let Some(elector) = take_lease(&opts, &client, &stop).await else {
            tracing::info!("stopped while standing by");
            return Ok(());
        };
        tracing::info!(identity = %opts.identity, "holding the lease: reconciling");
        Some((elector.clone(), keep_renewing(elector)))
    } else {
        None
    };

    let (tx, rx) = futures::channel::mpsc::unbounded();
    let changed = Arc::new(tokio::sync::Notify::new());
    let triggers = Triggers {
        all: tx.clone(),
        changed: changed.clone(),
    };
    let caches = Caches::start(&client, &triggers);
    drop(triggers);
    let liveness = follow_liveness(&opts, &client, &caches, tx);

    let programs_api = Api::<BpfPolyProgram>::all(client.clone());
    let controller = Controller::new(programs_api, watcher::Config::default())
        .trigger_backoff(WatchBackoff::steady())
        .with_config(
            kube::runtime::controller::Config::default()
                // No debounce: a steady stream of agent reports would keep postponing reconciles.
                // The scheduler already merges requests for a program that is queued.
                .concurrency(4),
        );
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: caches.nodes.clone(),
        profiles: caches.profiles.clone(),
        states: caches.states.clone(),
        programs: controller.store(),
        targets: Default::default(),
        dirty: Default::default(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "bpfpoly-operator".into(),
                instance: Some(opts.identity.clone()),
            },
        ),
        metrics,
        announced: Default::default(),
        unload_timeout: opts.unload_timeout,
        liveness,
        written: Default::default(),
    });

    let stopped_early = tokio::select! {
        r = caches.wait_until_ready() => { r?; false }
        () = stop.clone() => true,
    };
    if !stopped_early {
        tracing::info!(nodes = caches.nodes.state().len(), "caches ready");
        ready.store(true, Ordering::Relaxed);

        tokio::spawn(crate::writer::run(ctx.clone()));
        tokio::spawn(crate::writer::sweep_on_change(ctx.clone(), changed));

        controller
            .reconcile_all_on(rx)
            .graceful_shutdown_on(stop.clone())
            .run(reconcile, error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "reconcile outcome");
                }
            })
            .await;
    }
    tracing::info!("shutting down");
    if let Some((elector, renewing)) = lease {
        hand_back(&elector, renewing, &opts.lease_name).await;
    }
    Ok(())
}

/// `/metrics`, `/healthz` and `/readyz` on `opts.metrics_addr`.
/// The agents' liveness, from their Leases, on tasks of its own: a change (or a node
/// found lost) triggers a reconcile of every program through `tx`.
fn follow_liveness(
    opts: &Options,
    client: &Client,
    caches: &Caches,
    tx: futures::channel::mpsc::UnboundedSender<()>,
) -> Arc<crate::liveness::Liveness> {
    let liveness = Arc::new(crate::liveness::Liveness::new(
        opts.node_lost_after,
        &opts.node_lease_namespace,
    ));
    tokio::spawn(watch_leases(
        Api::namespaced(client.clone(), &opts.node_lease_namespace),
        liveness.clone(),
        tx.clone(),
    ));
    tokio::spawn(notice_losses(liveness.clone(), caches.states.clone(), tx));
    liveness
}

async fn serve(opts: &Options, metrics: &Metrics, ready: &Arc<AtomicBool>) -> Result<(), RunError> {
    let render = metrics.clone();
    bpfpoly_runtime::serve_http(
        opts.metrics_addr,
        move || {
            let text = render.encode();
            async move { Ok(text) }
        },
        ready.clone(),
        "not ready: waiting for caches or the lease",
    )
    .await?;
    tracing::info!(addr = %opts.metrics_addr, "serving /metrics, /healthz, /readyz");
    Ok(())
}

/// Waits until this replica holds the lease; `None` when stopped first.
async fn take_lease(
    opts: &Options,
    client: &Client,
    stop: &futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> Option<crate::leader::Elector> {
    let elector = crate::leader::Elector::new(
        client.clone(),
        &opts.lease_namespace,
        &opts.lease_name,
        &opts.identity,
        opts.lease_duration.max(Duration::from_secs(2)),
    );
    tracing::info!(lease = %opts.lease_name, namespace = %opts.lease_namespace, identity = %opts.identity, "waiting for the lease");
    let mut last_holder = None;
    loop {
        if stop.peek().is_some() {
            return None;
        }
        // The API server may not be reachable yet (or restarting): retry rather than exit.
        match elector.try_acquire().await {
            Ok(crate::leader::Attempt::Holding) => return Some(elector),
            Ok(crate::leader::Attempt::Standby { holder }) => {
                if !holder.is_empty() && last_holder.as_ref() != Some(&holder) {
                    tracing::info!(%holder, "standing by: the lease is held");
                    last_holder = Some(holder);
                }
                let _ = tokio::time::timeout(elector.poll_interval(), stop.clone()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the lease yet; retrying in 2 s");
                let _ = tokio::time::timeout(Duration::from_secs(2), stop.clone()).await;
            }
        }
    }
}

/// Renews the lease for as long as this replica runs; losing it exits the process (3), so
/// that a supervisor restarts it as a standby.
fn keep_renewing(keeper: crate::leader::Elector) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(keeper.renew_interval()).await;
            match keeper.try_acquire().await {
                Ok(crate::leader::Attempt::Holding) => {}
                Ok(crate::leader::Attempt::Standby { holder }) => {
                    tracing::error!(%holder, "lost the lease: exiting so a standby takes over");
                    std::process::exit(3);
                }
                // Nobody can take the lease while the API server is unreachable.
                Err(e) => tracing::warn!(error = %e, "cannot renew the lease; still leading"),
            }
        }
    })
}

/// Hands the lease back, so a standby takes over now rather than when the term ends.
async fn hand_back(
    elector: &crate::leader::Elector,
    renewing: tokio::task::JoinHandle<()>,
    lease_name: &str,
) {
    renewing.abort();
    let _ = renewing.await;
    match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
        Ok(Ok(true)) => tracing::info!(lease = %lease_name, "released the lease"),
        Ok(Ok(false)) => {
            tracing::info!(lease = %lease_name, "the lease was not ours any more")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the lease; it runs out by itself")
        }
        Err(_) => tracing::warn!("releasing the lease timed out; it runs out by itself"),
    }
}

/// What programs depend on, cached: node labels, profile status and agent-reported state
/// status. A change that matters triggers every program (`reflect`).
struct Caches {
    nodes: Store<Node>,
    profiles: Store<BpfNodeProfile>,
    states: Store<BpfNodeState>,
}

impl Caches {
    /// Starts the three reflectors on their own tasks.
    fn start(client: &Client, triggers: &Triggers) -> Self {
        // What a node state or profile the operator itself just created looks like: no status.
        let no_status = Some(status_fingerprint(&None::<()>, &Default::default()));
        let nodes = reflect(
            client,
            triggers,
            |n: &Node| hash_of(&n.metadata.labels),
            None,
            // Only names and labels are read: a real Node's status (images, conditions) and
            // annotations would be most of the cache.
            |n: &mut Node| {
                n.status = None;
                n.spec = None;
                n.metadata.annotations = None;
                n.metadata.managed_fields = None;
            },
        );
        let profiles = reflect(
            client,
            triggers,
            |p: &BpfNodeProfile| status_fingerprint(&p.status, &p.metadata),
            no_status,
            // managedFields are a large share of each object; only who wrote the status is read.
            |p: &mut BpfNodeProfile| crate::trust::keep_status_writers(&mut p.metadata),
        );
        let interner = crate::intern::Interner::default();
        let states = reflect(
            client,
            triggers,
            |s: &BpfNodeState| status_fingerprint(&s.status, &s.metadata),
            no_status,
            move |s: &mut BpfNodeState| {
                crate::trust::keep_status_writers(&mut s.metadata);
                s.spec.programs.iter_mut().for_each(|a| interner.intern(a));
            },
        );
        Self {
            nodes,
            profiles,
            states,
        }
    }

    /// Resolves once every cache has listed; an error names the one that never did.
    async fn wait_until_ready(&self) -> Result<(), RunError> {
        for (what, ready) in [
            ("nodes", self.nodes.wait_until_ready().await.is_ok()),
            ("profiles", self.profiles.wait_until_ready().await.is_ok()),
            ("states", self.states.wait_until_ready().await.is_ok()),
        ] {
            if !ready {
                return Err(RunError::Config(format!(
                    "the {what} cache never became ready"
                )));
            }
        }
        Ok(())
    }
}

/// Resolves on the first SIGTERM or SIGINT (cloneable: every waiter sees the same signal).
fn shutdown_signal() -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt;
    async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; only SIGINT stops the operator");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("stop requested (signal)");
    }
    .boxed()
    .shared()
}
