//! `bpfpoly-agent run`: publishes this node's profile, answers the operator's queries,
//! applies the node's assignments through the loader, and reports status, Events and
//! metrics. SIGTERM (or SIGKILL) leaves the programs running; a restarted agent adopts them.
//!
//! Its parts: `answers` (the profile and the operator's queries), `bytecode` (what a load
//! needs first), `resolve` (the node state's entries read against their programs), `reconcile` (one
//! pass over the node's state), `report` (metrics, Events,
//! status) and `http` (the endpoints).

mod answers;
mod bytecode;
mod http;
mod reconcile;
mod report;
mod resolve;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bpfpoly_agent::loader::{Loader, LoaderConfig};
use bpfpoly_crds::state::ProgramStatus;
use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};

use crate::metrics::Metrics;
use crate::retry::LoadBackoff;
use crate::{btf, profile};
use bpfpoly_runtime::WatchBackoff;
use http::ConfigFallbacks;

/// Options of `run`.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name.
    pub node_name: String,
    /// Kubeconfig; in-cluster or `$KUBECONFIG` when absent.
    pub kubeconfig: Option<PathBuf>,
    /// Kernel BTF to answer from.
    pub btf_path: PathBuf,
    /// Kernel release to report instead of the running one.
    pub kernel_release: Option<String>,
    /// Largest BTF accepted.
    pub max_btf_bytes: u64,
    /// Root of this agent's pins on bpffs.
    pub bpffs_root: PathBuf,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Directories `bytecode.path` may resolve into.
    pub allowed_dirs: Vec<PathBuf>,
    /// Namespaces whose ConfigMaps may hold bytecode.
    pub configmap_namespaces: Vec<String>,
    /// Largest object accepted.
    pub max_object_bytes: u64,
    /// Turn on kernel run-time statistics (BPF_ENABLE_STATS) for the run-time metrics.
    pub enable_stats: bool,
    /// Interface renames `FROM=TO`, for a second agent on the same host.
    pub interface_aliases: Vec<(String, String)>,
    /// Namespace of this node's liveness Lease.
    pub lease_namespace: String,
    /// How often the liveness Lease is renewed.
    pub lease_renew_interval: std::time::Duration,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Client configuration.
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(String),
    /// The kernel profile.
    #[error("profile: {0}")]
    Profile(#[from] profile::ProfileError),
    /// The loader could not start.
    #[error("loader: {0}")]
    Loader(#[from] bpfpoly_agent::loader::LoaderError),
    /// An API call failed where the agent cannot go on.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Metrics.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// No usable kubeconfig (the message names it).
    #[error(transparent)]
    Kubeconfig(#[from] bpfpoly_runtime::ClientError),
    /// The HTTP endpoint.
    #[error(transparent)]
    Bind(#[from] bpfpoly_runtime::BindError),
}

struct Agent {
    config_fallbacks: ConfigFallbacks,
    opts: Options,
    client: Client,
    loader: Arc<Mutex<Loader>>,
    metrics: Metrics,
    recorder: Recorder,
    kbtf: Option<Arc<btf::KernelBtf>>,
    /// `kbtf` is the running kernel's (the probes take their attach targets from it).
    btf_is_running_kernel: bool,
    release: String,
    /// Program types seen loading for real, published in the profile.
    observed: BTreeSet<String>,
    /// Statuses of programs removed in this run, reported Unloaded once.
    unloaded: BTreeMap<String, ProgramStatus>,
    /// Last answered queries, to answer only on change.
    answered: Vec<String>,
    /// Failed loads waiting for their next try, with the status to report meanwhile.
    backoff: LoadBackoff<ProgramStatus>,
    /// The kernel boot every report names.
    boot_id: Option<String>,
    /// The BpfPolyPrograms read (the variant definitions the node state names).
    programs: Store<BpfPolyProgram>,
    /// Node-state entries resolved against them.
    resolved: resolve::Resolved,
}

fn mount_if_missing(target: &str, fstype: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
    {
        return;
    }
    let _ = std::fs::create_dir_all(target);
    match std::process::Command::new("mount")
        .args(["-t", fstype, fstype, target])
        .status()
    {
        Ok(s) if s.success() => tracing::info!(%target, %fstype, "mounted"),
        Ok(s) => tracing::warn!(%target, %fstype, status = %s, "cannot mount"),
        Err(e) => tracing::warn!(%target, %fstype, error = %e, "cannot run mount"),
    }
}

/// Runs the agent until SIGTERM/SIGINT. Top-down: the mounts it needs, the client and the
/// liveness Lease, the kernel profile, the loader (adopting what runs), the endpoints, the
/// profile published, then the watch loop.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    mount_if_missing("/sys/fs/bpf", "bpf");
    mount_if_missing("/sys/kernel/tracing", "tracefs");
    let client = bpfpoly_runtime::client(opts.kubeconfig.as_deref()).await?;
    // Liveness first, and on its own task: it must keep renewing while loads run.
    tokio::spawn(crate::liveness::renew_forever(
        client.clone(),
        opts.lease_namespace.clone(),
        opts.node_name.clone(),
        opts.lease_renew_interval,
    ));
    let metrics = Metrics::new()?;
    // Kernel run-time statistics stay on while the fd is held.
    let _stats = opts.enable_stats.then(enable_stats).flatten();
    let (node_profile, kbtf) = profile_node(&opts).await?;
    let loader = Arc::new(Mutex::new(start_loader(&opts)?));
    let ready = Arc::new(AtomicBool::new(false));
    let config_fallbacks: ConfigFallbacks = Arc::default();
    http::serve_http(
        opts.metrics_addr,
        metrics.clone(),
        loader.clone(),
        config_fallbacks.clone(),
        ready.clone(),
    )
    .await?;

    let (programs_store, programs_writer) = reflector::store();
    let mut agent = Agent {
        config_fallbacks,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "bpfpoly-agent".into(),
                instance: Some(opts.node_name.clone()),
            },
        ),
        release: node_profile.status.kernel.release.clone(),
        opts,
        client,
        loader,
        metrics,
        kbtf: Some(Arc::new(kbtf)),
        btf_is_running_kernel: node_profile.btf_is_running_kernel,
        observed: BTreeSet::new(),
        unloaded: BTreeMap::new(),
        answered: Vec::new(),
        backoff: LoadBackoff::default(),
        boot_id: crate::liveness::boot_id(),
        programs: programs_store,
        resolved: resolve::Resolved::default(),
    };
    // The API server may not be reachable yet (or restarting): retry rather than exit.
    while let Err(e) = agent
        .publish_profile(node_profile.status.clone(), true)
        .await
    {
        tracing::warn!(error = %e, "cannot publish the profile yet; retrying in 2 s");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    ready.store(true, Ordering::Relaxed);
    agent.watch(programs_writer).await?;
    tracing::info!(
        "stopping; the programs keep running (use `bpfpoly-agent cleanup` to remove them)"
    );
    Ok(())
}

/// BPF_ENABLE_STATS for the run-time metrics; they stay at zero without it.
fn enable_stats() -> Option<std::os::fd::OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, "BPF_ENABLE_STATS failed: run-time metrics stay at zero");
            None
        }
    }
}

/// The kernel profile, on a blocking task (reading and indexing BTF takes a while).
async fn profile_node(
    opts: &Options,
) -> Result<(profile::NodeProfile, btf::KernelBtf), AgentError> {
    let started = std::time::Instant::now();
    let profile_opts = profile::ProfileOptions {
        btf_path: opts.btf_path.clone(),
        max_btf_bytes: opts.max_btf_bytes,
        kernel_release: opts.kernel_release.clone(),
        queries: Vec::new(),
    };
    let (node_profile, kbtf) =
        tokio::task::spawn_blocking(move || profile::profile_node_with_btf(&profile_opts))
            .await
            .map_err(|e| AgentError::Client(format!("profile task: {e}")))??;
    tracing::info!(
        node = %opts.node_name,
        release = %node_profile.status.kernel.release,
        btf_types = node_profile.status.btf.types,
        ms = started.elapsed().as_millis() as u64,
        "profiled"
    );
    Ok((node_profile, kbtf))
}

/// The loader, with the programs a previous agent left pinned adopted.
fn start_loader(opts: &Options) -> Result<Loader, AgentError> {
    let mut loader = Loader::new(LoaderConfig {
        bpffs_root: opts.bpffs_root.clone(),
        allowed_dirs: opts.allowed_dirs.clone(),
        max_object_bytes: opts.max_object_bytes,
    })?;
    for a in loader.adopt() {
        tracing::info!(program = %a.name, digest = %a.digest, consistent = a.consistent, note = ?a.note, "adopted pinned program");
    }
    Ok(loader)
}

impl Agent {
    /// The BpfPolyPrograms' watch, driven until its first list is in the store (so that the
    /// first pass over the node state finds the programs it names); the stream goes on
    /// keeping the store current.
    async fn read_programs(
        &self,
        writer: reflector::store::Writer<BpfPolyProgram>,
    ) -> impl futures::Stream<Item = Result<BpfPolyProgram, watcher::Error>> {
        let mut stream = Box::pin(
            reflector::reflector(
                writer,
                watcher(
                    Api::<BpfPolyProgram>::all(self.client.clone()),
                    watcher::Config::default(),
                ),
            )
            .backoff(WatchBackoff::jittered())
            .applied_objects(),
        );
        let ready = self.programs.wait_until_ready();
        let mut ready = std::pin::pin!(ready);
        loop {
            tokio::select! {
                _ = &mut ready => break,
                next = stream.next() => match next {
                    Some(Err(e)) => tracing::warn!(error = %e, "cannot read the BpfPolyPrograms yet; retrying"),
                    Some(Ok(_)) => {}
                    None => break,
                },
            }
        }
        stream
    }

    /// Watches this node's profile and state until SIGTERM or SIGINT: queries answered,
    /// states reconciled, failed loads retried when their backoff ends and every 30 s.
    async fn watch(
        &mut self,
        programs_writer: reflector::store::Writer<BpfPolyProgram>,
    ) -> Result<(), AgentError> {
        let name = self.opts.node_name.clone();
        let selector = format!("metadata.name={name}");
        let mut programs = std::pin::pin!(self.read_programs(programs_writer).await);
        let profiles = watcher(
            Api::<BpfNodeProfile>::all(self.client.clone()),
            watcher::Config::default().fields(&selector),
        )
        .backoff(WatchBackoff::jittered())
        .applied_objects();
        let states = watcher(
            Api::<BpfNodeState>::all(self.client.clone()),
            watcher::Config::default().fields(&selector),
        )
        .backoff(WatchBackoff::jittered())
        .applied_objects();
        let mut profiles = std::pin::pin!(profiles);
        let mut states = std::pin::pin!(states);
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| AgentError::Client(format!("signal handler: {e}")))?;
        // Failed loads are retried on a timer too (a ConfigMap may appear, an interface come
        // up): each when its backoff ends (`retry`), and everything every 30 s.
        let mut resync = tokio::time::interval(std::time::Duration::from_secs(30));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_state: Option<BpfNodeState> = None;
        // After a state watch error the agent also reads its state directly, every second
        // until the watch delivers again (for at most 30 s after the last error): an API
        // server that comes back can take 10 s to answer the resumed watch (with "too old
        // resource version"), and the agent would see changes only after that.
        let mut refetch = tokio::time::interval(std::time::Duration::from_secs(1));
        refetch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch_broken: Option<std::time::Instant> = None;
        let states_api = Api::<BpfNodeState>::all(self.client.clone());
        // The spec generation last applied: a resumed watch replays older versions of the
        // state after a direct read has applied a newer one; those are skipped.
        let newer = |s: &BpfNodeState, last: &Option<BpfNodeState>| {
            let generation = |s: &BpfNodeState| s.metadata.generation.unwrap_or(0);
            last.as_ref().is_none_or(|l| generation(s) >= generation(l))
        };
        loop {
            let retry_due = self.backoff.next_due();
            let retry_at =
                tokio::time::Instant::from_std(retry_due.unwrap_or_else(std::time::Instant::now));
            tokio::select! {
                Some(p) = profiles.next() => match p {
                    Ok(p) => self.answer(&p).await,
                    Err(e) => tracing::warn!(error = %e, "profile watch error; retrying"),
                },
                Some(p) = programs.next() => match p {
                    // A program some entry waits for changed: resolve and apply again.
                    Ok(p) if self.resolved.waiting.contains(&p.name_any()) => {
                        if let Some(s) = &last_state {
                            self.reconcile(s).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "program watch error; retrying"),
                },
                Some(s) = states.next() => match s {
                    Ok(s) => {
                        watch_broken = None;
                        if newer(&s, &last_state) {
                            self.reconcile(&s).await;
                            last_state = Some(s);
                        }
                    }
                    Err(e) => {
                        watch_broken = Some(std::time::Instant::now());
                        tracing::warn!(error = %e, "state watch error; retrying");
                    }
                },
                _ = refetch.tick(), if watch_broken.is_some_and(|t| t.elapsed().as_secs() < 30) => {
                    if let Ok(Some(s)) = states_api.get_opt(&name).await {
                        if newer(&s, &last_state)
                            && last_state.as_ref().is_none_or(|l| l.metadata.resource_version != s.metadata.resource_version)
                        {
                            self.reconcile(&s).await;
                            last_state = Some(s);
                        }
                    }
                },
                _ = resync.tick() => {
                    if let Some(s) = &last_state {
                        self.reconcile(s).await;
                    }
                },
                _ = tokio::time::sleep_until(retry_at), if retry_due.is_some() => {
                    if let Some(s) = &last_state {
                        self.reconcile(s).await;
                    }
                },
                _ = sigterm.recv() => return Ok(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}
