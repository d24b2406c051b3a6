//! `bpfpoly-agent run`: publishes this node's profile, answers the operator's queries,
//! applies the node's assignments through the loader, and reports status, Events and
//! metrics. SIGTERM (or SIGKILL) leaves the programs running; a restarted agent adopts them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bpfpoly_agent::fetch::{check_sha256, describe, fetch_path, FetchError, Prefetched};
use bpfpoly_agent::loader::{assignment_digest, Loader, LoaderConfig, Outcome};
use bpfpoly_crds::program::Bytecode;
use bpfpoly_crds::requirement::Query;
use bpfpoly_crds::select::attach_program_type;
use bpfpoly_crds::state::{
    agent_field_manager, FallbackStage, Phase, ProgramAssignment, ProgramStatus, StateSummary,
};
use bpfpoly_crds::{BpfNodeProfile, BpfNodeProfileStatus, BpfNodeState, BpfNodeStateStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

use crate::metrics::{Metrics, ProgramSnapshot};
use crate::retry::{Attempt, LoadBackoff};
use crate::{btf, probe, profile};
use bpfpoly_agent::builtin;
use bpfpoly_runtime::WatchBackoff;

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

/// Config fields that fell back, per program (for `bpfpoly_config_fallbacks`).
type ConfigFallbacks = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

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

/// Runs the agent until SIGTERM/SIGINT.
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
    let _stats = if opts.enable_stats {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "BPF_ENABLE_STATS failed: run-time metrics stay at zero");
                None
            }
        }
    } else {
        None
    };

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
    let kbtf: Option<Arc<btf::KernelBtf>> = Some(Arc::new(kbtf));
    tracing::info!(
        node = %opts.node_name,
        release = %node_profile.status.kernel.release,
        btf_types = node_profile.status.btf.types,
        ms = started.elapsed().as_millis() as u64,
        "profiled"
    );

    let mut loader = Loader::new(LoaderConfig {
        bpffs_root: opts.bpffs_root.clone(),
        allowed_dirs: opts.allowed_dirs.clone(),
        max_object_bytes: opts.max_object_bytes,
    })?;
    for a in loader.adopt() {
        tracing::info!(program = %a.name, digest = %a.digest, consistent = a.consistent, note = ?a.note, "adopted pinned program");
    }
    let loader = Arc::new(Mutex::new(loader));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config_fallbacks: ConfigFallbacks = Arc::default();
    serve_http(
        opts.metrics_addr,
        metrics.clone(),
        loader.clone(),
        config_fallbacks.clone(),
        ready.clone(),
    )
    .await?;

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
        kbtf,
        btf_is_running_kernel: node_profile.btf_is_running_kernel,
        observed: BTreeSet::new(),
        unloaded: BTreeMap::new(),
        answered: Vec::new(),
        backoff: LoadBackoff::default(),
        boot_id: crate::liveness::boot_id(),
    };
    // The API server may not be reachable yet (or restarting): retry rather than exit.
    while let Err(e) = agent
        .publish_profile(node_profile.status.clone(), true)
        .await
    {
        tracing::warn!(error = %e, "cannot publish the profile yet; retrying in 2 s");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    let name = agent.opts.node_name.clone();
    let selector = format!("metadata.name={name}");
    let profiles = watcher(
        Api::<BpfNodeProfile>::all(agent.client.clone()),
        watcher::Config::default().fields(&selector),
    )
    .backoff(WatchBackoff::jittered())
    .applied_objects();
    let states = watcher(
        Api::<BpfNodeState>::all(agent.client.clone()),
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
    // After a state watch error the agent also reads its state directly, every second until
    // the watch delivers again (for at most 30 s after the last error): an API server that
    // comes back can take 10 s to answer the resumed watch (with "too old resource
    // version"), and the agent would see changes only after that.
    let mut refetch = tokio::time::interval(std::time::Duration::from_secs(1));
    refetch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch_broken: Option<std::time::Instant> = None;
    let states_api = Api::<BpfNodeState>::all(agent.client.clone());
    // The spec generation last applied: a resumed watch replays older versions of the state
    // after a direct read has applied a newer one; those are skipped.
    let newer = |s: &BpfNodeState, last: &Option<BpfNodeState>| {
        let generation = |s: &BpfNodeState| s.metadata.generation.unwrap_or(0);
        last.as_ref().is_none_or(|l| generation(s) >= generation(l))
    };
    loop {
        let retry_due = agent.backoff.next_due();
        let retry_at =
            tokio::time::Instant::from_std(retry_due.unwrap_or_else(std::time::Instant::now));
        tokio::select! {
            Some(p) = profiles.next() => match p {
                Ok(p) => agent.answer(&p).await,
                Err(e) => tracing::warn!(error = %e, "profile watch error; retrying"),
            },
            Some(s) = states.next() => match s {
                Ok(s) => {
                    watch_broken = None;
                    if newer(&s, &last_state) {
                        agent.reconcile(&s).await;
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
                        agent.reconcile(&s).await;
                        last_state = Some(s);
                    }
                }
            },
            _ = resync.tick() => {
                if let Some(s) = &last_state {
                    agent.reconcile(s).await;
                }
            },
            _ = tokio::time::sleep_until(retry_at), if retry_due.is_some() => {
                if let Some(s) = &last_state {
                    agent.reconcile(s).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!(
        "stopping; the programs keep running (use `bpfpoly-agent cleanup` to remove them)"
    );
    Ok(())
}

/// `/metrics` renders the registry with the kernel-side values read at scrape time.
async fn serve_http(
    addr: SocketAddr,
    metrics: Metrics,
    loader: Arc<Mutex<Loader>>,
    config_fallbacks: ConfigFallbacks,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), AgentError> {
    let render = move || {
        let metrics = metrics.clone();
        let loader = loader.clone();
        let cf = config_fallbacks.clone();
        async move {
            let snapshot = tokio::task::spawn_blocking(move || snapshot(&loader, &cf))
                .await
                .unwrap_or_default();
            metrics.render(&snapshot).map_err(|e| e.to_string())
        }
    };
    bpfpoly_runtime::serve_http(addr, render, ready, "not ready: profiling").await?;
    Ok(())
}

/// Reads the kernel-side values of every running program (at scrape time).
fn snapshot(
    loader: &Mutex<Loader>,
    config_fallbacks: &Mutex<BTreeMap<String, Vec<String>>>,
) -> Vec<ProgramSnapshot> {
    let cf = config_fallbacks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let loader = loader
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loader
        .running()
        .map(|(name, info)| {
            let status = loader.status(name);
            let dispatch = loader
                .dispatch_counts(name)
                .map(|c| (c.per_key.into_iter().collect(), c.default));
            let runs = loader
                .run_stats(name)
                .unwrap_or_default()
                .into_iter()
                .map(|(prog, st)| (prog, st.run_time.as_nanos() as u64, st.run_count))
                .collect();
            ProgramSnapshot {
                program: name.to_string(),
                variant: info.variant.clone(),
                mechanism: info.mechanism.clone().unwrap_or_else(|| "none".into()),
                dispatch,
                runs,
                empty_slots: status
                    .map(|s| {
                        s.handlers
                            .iter()
                            .filter(|h| h.state != "Loaded")
                            .map(|h| h.key)
                            .collect()
                    })
                    .unwrap_or_default(),
                config_fallbacks: cf.get(name).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

impl Agent {
    fn api_profiles(&self) -> Api<BpfNodeProfile> {
        Api::all(self.client.clone())
    }

    /// Publishes the profile status (creating the object first when needed).
    async fn publish_profile(
        &mut self,
        mut status: BpfNodeProfileStatus,
        create: bool,
    ) -> Result<(), AgentError> {
        let api = self.api_profiles();
        let name = &self.opts.node_name;
        // The operator believes a node's status only when this manager wrote it.
        let manager = agent_field_manager(name);
        let pp = PatchParams::apply(&manager).force();
        if create && api.get_opt(name).await?.is_none() {
            let obj = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
                "metadata": {"name": name}, "spec": {}});
            api.patch(name, &pp, &Patch::Apply(&obj)).await?;
        }
        status.observed_program_types = self.observed.iter().cloned().collect();
        status.agent_version = env!("CARGO_PKG_VERSION").to_string();
        let mut status = serde_json::to_value(&status)
            .map_err(|e| AgentError::Client(format!("profile status: {e}")))?;
        if status["answers"].as_object().is_some_and(|a| a.is_empty()) {
            // Kubernetes 1.20's server-side apply turns a map whose last owned keys are
            // removed into null, which the schema refuses (422), e.g. on a restart after the
            // node answered queries: clear it with a merge patch and leave it out of the apply.
            if let Some(s) = status.as_object_mut() {
                s.remove("answers");
            }
            let clear = serde_json::json!({"status": {"answers": null}});
            let merge = PatchParams {
                field_manager: Some(manager.clone()),
                ..PatchParams::default()
            };
            api.patch_status(name, &merge, &Patch::Merge(&clear))
                .await?;
        }
        let patch = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "status": status});
        api.patch_status(name, &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    /// Answers `spec.queries` when they change.
    async fn answer(&mut self, p: &BpfNodeProfile) {
        if p.spec.queries == self.answered
            && p.status
                .as_ref()
                .is_some_and(|s| !s.kernel.release.is_empty())
        {
            return;
        }
        let queries: Vec<Query> = p
            .spec
            .queries
            .iter()
            .filter_map(|q| match Query::parse(q) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(query = %q, error = %e, "ignoring a malformed query");
                    None
                }
            })
            .collect();
        let kbtf = self.kbtf.clone();
        let running_btf = self.btf_is_running_kernel;
        let release = self.release.clone();
        let built = tokio::task::spawn_blocking(move || {
            let probed = probe::probe_all(&queries, || match &kbtf {
                Some(b) if running_btf => probe::AttachTargets::from_btf(b),
                _ => probe::AttachTargets::from_running_kernel(),
            });
            let mut status = profile::build_profile(kbtf.as_deref(), &release, &queries, &probed).0;
            if let Some(b) = &kbtf {
                status.btf.source = b.source().display().to_string();
            }
            status
        })
        .await;
        match built {
            Ok(status) => {
                let n = status.answers.len();
                match self.publish_profile(status, false).await {
                    Ok(()) => {
                        tracing::info!(answers = n, "answered the operator's queries");
                        self.answered = p.spec.queries.clone();
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot publish answers"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "answering task failed"),
        }
    }

    /// Renames interfaces for a second agent on the same host.
    fn aliased(&self, a: &ProgramAssignment) -> ProgramAssignment {
        let mut a = a.clone();
        if self.opts.interface_aliases.is_empty() {
            return a;
        }
        let rename = |i: &mut String| {
            if let Some((_, to)) = self
                .opts
                .interface_aliases
                .iter()
                .find(|(from, _)| from == i)
            {
                i.clone_from(to);
            }
        };
        for v in &mut a.candidates {
            for p in &mut v.programs {
                if let Some(att) = &mut p.attach {
                    if let Some(x) = &mut att.xdp {
                        x.interfaces.iter_mut().for_each(rename);
                    }
                    if let Some(t) = &mut att.tc {
                        t.interfaces.iter_mut().for_each(rename);
                    }
                }
            }
        }
        a
    }

    /// Fetches every bytecode the assignment may need (ConfigMaps are async, so before the
    /// blocking load).
    async fn prefetch(&self, a: &ProgramAssignment) -> Prefetched {
        let mut out = Prefetched::default();
        for v in &a.candidates {
            for b in std::iter::once(&v.bytecode).chain(v.handler_bytecode.iter()) {
                if out.contains(b) {
                    continue;
                }
                let got = self.fetch_one(b).await;
                out.insert(b, got);
            }
        }
        out
    }

    async fn fetch_one(&self, b: &Bytecode) -> Result<Vec<u8>, FetchError> {
        if let Some(name) = &b.builtin {
            let bytes = builtin::builtin(name).ok_or_else(|| FetchError::Unavailable {
                what: format!("builtin {name:?}"),
                reason: format!(
                    "no such built-in object; this agent has {}",
                    builtin::names().join(", ")
                ),
            })?;
            check_sha256(bytes, b.sha256.as_deref())?;
            return Ok(bytes.to_vec());
        }
        if let Some(cm) = &b.config_map {
            let what = describe(b);
            if !self.opts.configmap_namespaces.contains(&cm.namespace) {
                return Err(FetchError::Unavailable {
                    what,
                    reason: format!(
                        "namespace {:?} is not one this agent reads bytecode from ({})",
                        cm.namespace,
                        self.opts.configmap_namespaces.join(", ")
                    ),
                });
            }
            let sha = b
                .sha256
                .as_deref()
                .ok_or_else(|| FetchError::MissingSha256 { what: what.clone() })?;
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &cm.namespace);
            let map = api
                .get_opt(&cm.name)
                .await
                .map_err(|e| FetchError::Unavailable {
                    what: what.clone(),
                    reason: e.to_string(),
                })?
                .ok_or_else(|| FetchError::Unavailable {
                    what: what.clone(),
                    reason: "ConfigMap not found".into(),
                })?;
            let bytes = map
                .binary_data
                .and_then(|d| d.get(&cm.key).map(|b| b.0.clone()))
                .ok_or_else(|| FetchError::Unavailable {
                    what: what.clone(),
                    reason: format!("no binaryData key {:?}", cm.key),
                })?;
            if bytes.len() as u64 > self.opts.max_object_bytes {
                return Err(FetchError::TooLarge {
                    what,
                    size: bytes.len() as u64,
                    limit: self.opts.max_object_bytes,
                });
            }
            check_sha256(&bytes, Some(sha))?;
            return Ok(bytes);
        }
        if let Some(path) = &b.path {
            return fetch_path(
                path,
                b.sha256.as_deref(),
                &self.opts.allowed_dirs,
                self.opts.max_object_bytes,
            );
        }
        Err(FetchError::Unavailable {
            what: describe(b),
            reason: "none of builtin, configMap and path is set".into(),
        })
    }

    /// Applies the node's assignments and reports status.
    async fn reconcile(&mut self, state: &BpfNodeState) {
        let desired: Vec<ProgramAssignment> = state
            .spec
            .programs
            .iter()
            .map(|a| self.aliased(a))
            .collect();
        let mut statuses: Vec<ProgramStatus> = Vec::new();
        *self
            .config_fallbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = desired
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    a.config
                        .iter()
                        .filter(|c| c.fell_back)
                        .map(|c| c.name.clone())
                        .collect(),
                )
            })
            .collect();
        for a in &desired {
            let attempt = Attempt {
                digest: assignment_digest(a),
                generation: a.generation,
            };
            // A failed assignment waits for its next try: report what its last try said.
            if let Some(last) = self
                .backoff
                .waiting(&a.name, &attempt, std::time::Instant::now())
            {
                statuses.push(last.clone());
                continue;
            }
            // What runs already is not fetched again: the loader finds it unchanged.
            let running = self
                .loader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .running()
                .any(|(name, info)| name == a.name && info.digest == attempt.digest);
            let fetched = if running {
                Prefetched::default()
            } else {
                self.prefetch(a).await
            };
            let loader = self.loader.clone();
            let a2 = a.clone();
            let applied = tokio::task::spawn_blocking(move || {
                let fetch = |b: &Bytecode| fetched.get(b);
                let mut l = loader
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                l.apply(&a2, &fetch)
            })
            .await;
            let applied = match applied {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(program = %a.name, error = %e, "load task failed");
                    continue;
                }
            };
            if applied.outcome != Outcome::Unchanged {
                self.metrics
                    .load_duration
                    .observe(applied.duration.as_secs_f64());
                tracing::info!(program = %a.name, outcome = ?applied.outcome, phase = ?applied.status.phase,
                    variant = ?applied.status.variant, ms = applied.duration.as_millis() as u64, "applied");
            }
            match applied.outcome {
                Outcome::Failed | Outcome::KeptPrevious => {
                    let delay = self.backoff.failed(
                        &a.name,
                        attempt,
                        std::time::Instant::now(),
                        applied.status.clone(),
                    );
                    tracing::info!(program = %a.name, generation = a.generation,
                        retry_in_s = delay.as_secs(), "load failed; trying again later");
                }
                Outcome::Loaded | Outcome::Updated | Outcome::Unchanged => {
                    self.backoff.succeeded(&a.name);
                }
            }
            self.record(a, &applied.status, &applied.fallbacks, applied.outcome)
                .await;
            statuses.push(applied.status);
        }
        // Programs no longer assigned: detach and unpin.
        let wanted: BTreeSet<&str> = desired.iter().map(|a| a.name.as_str()).collect();
        self.backoff.retain(|name| wanted.contains(name));
        let running: Vec<String> = {
            let l = self
                .loader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l.running()
                .map(|(n, _)| n.to_string())
                .filter(|n| !wanted.contains(n.as_str()))
                .collect()
        };
        for name in running {
            let removed = {
                let mut l = self
                    .loader
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                l.remove(&name)
            };
            let mut st = ProgramStatus {
                name: name.clone(),
                ..ProgramStatus::default()
            };
            match removed {
                Ok(()) => {
                    st.phase = Phase::Unloaded;
                    st.message = "removed from this node: detached and unpinned".into();
                    self.metrics.forget(&name);
                    tracing::info!(program = %name, "unloaded");
                }
                Err(e) => {
                    st.phase = Phase::Failed;
                    st.message = format!("unload failed: {e}");
                    tracing::warn!(program = %name, error = %e, "unload failed");
                }
            }
            st.last_transition_time = Some(k8s_openapi::jiff::Timestamp::now().to_string());
            self.unloaded.insert(name, st);
        }
        // Report Unloaded until the operator stops asking; then forget.
        self.unloaded.retain(|n, _| !wanted.contains(n.as_str()));
        statuses.extend(self.unloaded.values().cloned());
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        self.report(statuses).await;
        // Keep reporting Unloaded entries only for one round.
        self.unloaded.clear();
    }

    /// Metrics, Events and observed program types for one applied program.
    async fn record(
        &mut self,
        a: &ProgramAssignment,
        status: &ProgramStatus,
        fallbacks: &[bpfpoly_crds::state::FallbackRecord],
        outcome: Outcome,
    ) {
        if matches!(status.phase, Phase::Loaded | Phase::Degraded) {
            if let Some(v) = a
                .candidates
                .iter()
                .find(|v| Some(&v.name) == status.variant.as_ref())
            {
                let before = self.observed.len();
                self.observed.extend(
                    v.programs
                        .iter()
                        .filter_map(|p| p.attach.as_ref())
                        .map(|at| attach_program_type(at).to_string()),
                );
                if self.observed.len() != before {
                    if let Ok(Some(p)) = self.api_profiles().get_opt(&self.opts.node_name).await {
                        if let Some(s) = p.status {
                            if let Err(e) = self.publish_profile(s, false).await {
                                tracing::warn!(error = %e, "cannot publish observed program types");
                            }
                        }
                    }
                }
            }
        }
        if outcome == Outcome::Unchanged {
            return;
        }
        for f in fallbacks {
            let stage = f.stage.to_string();
            self.metrics.count_fallback(&a.name, &f.from, &f.to, &stage);
            if f.stage == FallbackStage::Verify && f.verifier_log.is_some() {
                self.metrics.count_rejection(&a.name, &f.from);
            }
            let reason = match f.stage {
                FallbackStage::Verify => "VerifierRejected",
                FallbackStage::Attach => "AttachFailed",
                FallbackStage::Handler => "HandlerRejected",
            };
            self.event(
                &a.name,
                EventType::Warning,
                reason,
                &format!(
                    "node {}: {} -> {} at {}: {}",
                    self.opts.node_name, f.from, f.to, f.stage, f.reason
                ),
            )
            .await;
        }
        match (outcome, status.phase) {
            (Outcome::KeptPrevious, _) => {
                self.event(
                    &a.name,
                    EventType::Warning,
                    "UpdateFailed",
                    &format!(
                        "node {}: update to generation {} failed, previous version kept: {}",
                        self.opts.node_name, a.generation, status.message
                    ),
                )
                .await;
            }
            (_, Phase::Failed) => {
                self.event(
                    &a.name,
                    EventType::Warning,
                    "LoadFailed",
                    &format!("node {}: {}", self.opts.node_name, status.message),
                )
                .await;
            }
            (_, Phase::Loaded | Phase::Degraded) => {
                self.event(
                    &a.name,
                    EventType::Normal,
                    "Loaded",
                    &format!(
                        "node {}: variant {} running ({:?})",
                        self.opts.node_name,
                        status.variant.as_deref().unwrap_or("-"),
                        status.phase
                    ),
                )
                .await;
            }
            _ => {}
        }
    }

    async fn event(&self, program: &str, type_: EventType, reason: &str, note: &str) {
        let mut note = note.to_string();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("bpfpoly.io/v1alpha1".into()),
            kind: Some("BpfPolyProgram".into()),
            name: Some(program.into()),
            // Kubernetes 1.20 wants the Event's namespace on the reference; programs are
            // cluster-scoped, so their Events live in `default`.
            namespace: Some("default".into()),
            ..Default::default()
        };
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Load".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(%program, error = %e, "cannot publish Event");
        }
    }

    async fn report(&self, programs: Vec<ProgramStatus>) {
        let summary = StateSummary {
            programs: programs
                .iter()
                .filter(|p| p.phase != Phase::Unloaded)
                .count() as u32,
            loaded: programs.iter().filter(|p| p.phase == Phase::Loaded).count() as u32,
            degraded: programs
                .iter()
                .filter(|p| p.phase == Phase::Degraded)
                .count() as u32,
            failed: programs.iter().filter(|p| p.phase == Phase::Failed).count() as u32,
        };
        let status = BpfNodeStateStatus {
            programs,
            summary,
            boot_id: self.boot_id.clone(),
        };
        let api: Api<BpfNodeState> = Api::all(self.client.clone());
        let patch = serde_json::json!({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeState", "status": status});
        if let Err(e) = api
            .patch_status(
                &self.opts.node_name,
                &PatchParams::apply(&agent_field_manager(&self.opts.node_name)).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot report status");
        }
    }
}
