//! The loader: turns a `ProgramAssignment` into eBPF programs running in the kernel,
//! with bpfpoly's three levels of fallback, and reports what it did as a
//! `ProgramStatus`. No Kubernetes here: the agent's run loop calls `apply`, `remove`
//! and `adopt`, publishes the status and observes the metrics.
//!
//! For each candidate variant, in order: fetch the bytecode (sha256 checked), check
//! the object against the CR (programs, sections, config globals and their BTF types,
//! dispatch pieces) without the kernel, load it with the config written into
//! `.rodata`, fill the dispatch slots (freplace, tail calls or static; a rejected
//! handler leaves its slot empty), attach, pin. A verifier rejection or an attach
//! failure moves on to the next candidate, recorded with the verifier log.
//!
//! Everything that runs is pinned under `<root>/<program>/<digest>/` (see `pins`), so
//! programs keep running when the agent stops, even on SIGKILL; dropping a `Loader`
//! detaches nothing. A restarted agent `adopt`s the pins. Updates are
//! make-before-break: the new version is loaded and verified in full first, XDP and
//! TCX links are switched atomically, and the old directory is removed last.

pub mod object;
pub mod verify;

mod adopt;
mod attach;
mod attempt;
mod candidate;
mod counters;
mod dispatch;
mod error;
mod mechanism;
#[cfg(test)]
mod netlink_tests;
mod pins;
mod record;
mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use bpfpoly_crds::{
    program::{Bytecode, OnVerifierReject},
    state::{FallbackRecord, FallbackStage, ProgramAssignment, ProgramStatus},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::fetch::{sha256_hex, FetchError, DEFAULT_MAX_OBJECT_BYTES};
use attempt::{parse_config, Success};
use candidate::{Failure, Kernel};
pub use object::Mechanism;
pub use pins::LinkRecord;

/// Default bpffs directory of the agent's pins.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/bpfpoly";
/// Default directory `bytecode.path` may point into.
pub const DEFAULT_BYTECODE_DIR: &str = "/var/lib/bpfpoly";
/// `status.fallbacks` is bounded (CRD: maxItems 32).
pub const MAX_FALLBACKS: usize = 32;
/// Slot of `bpfpoly_dispatch` counting the default path (bpfpoly.h).
pub const DEFAULT_SLOT: u32 = 256;

/// Now, to the second, as the status timestamps say it.
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Where the loader pins and what bytecode it accepts.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Directory on bpffs for the pins, e.g. `/sys/fs/bpf/bpfpoly`.
    pub bpffs_root: PathBuf,
    /// Directories `bytecode.path` may resolve into.
    pub allowed_dirs: Vec<PathBuf>,
    /// Largest object accepted, in bytes (default 16 MiB).
    pub max_object_bytes: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            allowed_dirs: vec![PathBuf::from(DEFAULT_BYTECODE_DIR)],
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
        }
    }
}

/// Errors of the loader's own operations (apply reports into the status instead).
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The pin root is not on a bpffs and could not be mounted.
    #[error("bpffs: {0}")]
    Bpffs(String),
    /// A filesystem operation on the pins failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl LoaderError {
    /// A bounded label for `bpfpoly_*_errors_total{reason}` style metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LoaderError::Bpffs(_) => "bpffs",
            LoaderError::Io { .. } => "io",
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What runs for one program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningInfo {
    /// Digest of the assignment this was loaded from (see `assignment_digest`).
    pub digest: String,
    /// Assignment generation last applied.
    pub generation: i64,
    /// The variant running.
    pub variant: String,
    /// `tailCall`, `static` or `freplace`; none without dispatch.
    pub mechanism: Option<String>,
    /// Kernel program ids by C function name (attached programs and handlers).
    pub programs: BTreeMap<String, u32>,
    /// The attachments.
    pub links: Vec<LinkRecord>,
    /// Dispatch keys (for the counters).
    pub dispatch_keys: Vec<u32>,
    /// The pin directory.
    #[serde(skip)]
    pub pin_dir: PathBuf,
}

impl RunningInfo {
    /// Kernel program ids, sorted.
    pub fn program_ids(&self) -> Vec<u32> {
        let ids: BTreeSet<u32> = self.programs.values().copied().collect();
        ids.into_iter().collect()
    }

    /// Pin path of a program (e.g. for BPF_PROG_TEST_RUN).
    pub fn program_pin(&self, program: &str) -> PathBuf {
        self.pin_dir.join(pins::program_pin(program))
    }

    /// Pin path of a map of the object (`jump_table`, `bpfpoly_dispatch`, others).
    pub fn map_pin(&self, map: &str) -> PathBuf {
        match map {
            pins::TABLE_PIN | pins::DISPATCH_PIN => self.pin_dir.join(map),
            other => self.pin_dir.join(pins::shared_map_pin(other)),
        }
    }
}

/// What `apply` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The assignment (digest) was already running; nothing was loaded.
    Unchanged,
    /// Loaded where nothing ran before.
    Loaded,
    /// Replaced a running version (make-before-break).
    Updated,
    /// The update failed; the previous version keeps running (keepPreviousOnFailure).
    KeptPrevious,
    /// Nothing runs.
    Failed,
}

/// The result of `apply`.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Status to publish.
    pub status: ProgramStatus,
    /// What happened.
    pub outcome: Outcome,
    /// Wall time of the apply (fetch, check, load, attach, pin): for
    /// `bpfpoly_load_duration_seconds`. Near zero for `Unchanged`.
    pub duration: Duration,
    /// When a later candidate runs: the time from the first candidate's failure
    /// (verifier rejection, attach failure) to the fallback attached and pinned.
    pub fallback_duration: Option<Duration>,
    /// The degradations this apply went through (empty when `Unchanged`): what to
    /// count in `bpfpoly_variant_fallbacks_total` and, for `stage: verify` with a
    /// verifier log, `bpfpoly_verifier_rejections_total{variant = from}`.
    pub fallbacks: Vec<FallbackRecord>,
}

/// Kernel run statistics of one program (collected while BPF stats are enabled:
/// `aya::sys::enable_stats(Stats::RunTime)` held open, or `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Accumulated run time.
    pub run_time: Duration,
    /// Number of runs.
    pub run_count: u64,
}

/// A program found pinned by a previous agent.
#[derive(Clone, Debug)]
pub struct Adopted {
    /// Program name.
    pub name: String,
    /// Digest of the assignment it was loaded from: compare with `assignment_digest`.
    pub digest: String,
    /// The status recorded at load time.
    pub status: ProgramStatus,
    /// What runs.
    pub info: RunningInfo,
    /// False when the kernel state did not match the record and could not be
    /// repaired (e.g. the agent died in the middle of an update): re-apply it.
    pub consistent: bool,
    /// What was found or repaired.
    pub note: Option<String>,
}

/// Dispatch counters of a running program, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DispatchCounts {
    /// Events delivered to the handler of each dispatch key.
    pub per_key: BTreeMap<u32, u64>,
    /// Events that took the default path (slot 256).
    pub default: u64,
}

/// The record pinned in `meta`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    version: u32,
    program: String,
    created_unix_ms: u64,
    status: ProgramStatus,
    info: RunningInfo,
}

struct Running {
    info: RunningInfo,
    status: ProgramStatus,
    counters: Option<PerCpuArray<MapData, u64>>,
    /// What the versions before this one counted (an update starts a fresh counter map):
    /// added to the running map's values, so the dispatch counters never go backwards
    /// while the agent runs.
    carried: DispatchCounts,
}

/// Owns the programs this agent runs.
pub struct Loader {
    cfg: LoaderConfig,
    running: BTreeMap<String, Running>,
    /// Last status returned per program (for lastTransitionTime).
    reported: BTreeMap<String, ProgramStatus>,
    kernel: Kernel,
}

/// Short SHA-256 of the assignment, generation excluded: a new generation that does
/// not change what this node loads does not reload it.
pub fn assignment_digest(a: &ProgramAssignment) -> String {
    let mut a = a.clone();
    a.generation = 0;
    let json = serde_json::to_vec(&a).unwrap_or_default();
    sha256_hex(&json)[..16].to_owned()
}

impl Loader {
    /// Makes sure the pin root is on a bpffs (mounting `/sys/fs/bpf` if needed) and
    /// exists; mounts tracefs if missing (tracepoint attach needs it).
    pub fn new(cfg: LoaderConfig) -> Result<Self, LoaderError> {
        pins::ensure_bpffs(&cfg.bpffs_root).map_err(LoaderError::Bpffs)?;
        fs::create_dir_all(&cfg.bpffs_root).map_err(io_error(&cfg.bpffs_root))?;
        if let Err(e) = pins::ensure_tracefs() {
            warn!("tracefs is not mounted and could not be: {e}; tracepoint attach will fail");
        }
        Ok(Self {
            cfg,
            running: BTreeMap::new(),
            reported: BTreeMap::new(),
            kernel: Kernel::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    fn program_dir(&self, name: &str) -> PathBuf {
        self.cfg.bpffs_root.join(pins::escape(name))
    }

    /// What runs, by program name.
    pub fn running(&self) -> impl Iterator<Item = (&str, &RunningInfo)> {
        self.running.iter().map(|(n, r)| (n.as_str(), &r.info))
    }

    /// The status of a running program.
    pub fn status(&self, name: &str) -> Option<&ProgramStatus> {
        self.running.get(name).map(|r| &r.status)
    }

    /// Kernel run statistics of each program of `name` (entry, attached programs,
    /// handlers), by C function name: for `bpfpoly_prog_run_seconds_total` and
    /// `bpfpoly_prog_runs_total`. Zero unless BPF stats are enabled; the kernel does
    /// not account handlers reached by tail call (their runs are the entry's).
    pub fn run_stats(&self, name: &str) -> Option<BTreeMap<String, RunStats>> {
        let running = self.running.get(name)?;
        let stats = running
            .info
            .programs
            .keys()
            .filter_map(|program| {
                let info =
                    aya::programs::ProgramInfo::from_pin(running.info.program_pin(program)).ok()?;
                Some((
                    program.clone(),
                    RunStats {
                        run_time: info.run_time(),
                        run_count: info.run_count(),
                    },
                ))
            })
            .collect();
        Some(stats)
    }

    /// Loads `a`, or updates what runs for it, or does nothing when its digest is
    /// already running. `fetch` resolves builtin and ConfigMap bytecode (and may
    /// delegate `path` to `fetch::fetch_path`). Never panics on hostile input.
    pub fn apply(
        &mut self,
        a: &ProgramAssignment,
        fetch: &dyn Fn(&Bytecode) -> Result<Vec<u8>, FetchError>,
    ) -> Applied {
        let start = Instant::now();
        let digest = assignment_digest(a);
        if let Some(run) = self.running.get_mut(&a.name) {
            if run.info.digest == digest {
                run.info.generation = a.generation;
                run.status.observed_generation = a.generation;
                let status = run.status.clone();
                self.reported.insert(a.name.clone(), status.clone());
                return Applied {
                    status,
                    outcome: Outcome::Unchanged,
                    duration: start.elapsed(),
                    fallback_duration: None,
                    fallbacks: Vec::new(),
                };
            }
        }
        let attempt = self.attempt(a, &digest, fetch);
        self.kernel.end_apply();
        let (mut status, outcome, fallback_duration, fallbacks) = match attempt {
            Ok(success) => {
                let since = success.since_first_failure;
                let (status, outcome) = self.commit(a, &digest, success);
                let fallbacks = status.fallbacks.clone();
                let since = since.filter(|_| outcome != Outcome::Failed);
                (status, outcome, since, fallbacks)
            }
            Err((fallbacks, cause)) => {
                let attempted = fallbacks.clone();
                let (status, outcome) = self.fail(a, fallbacks, cause);
                (status, outcome, None, attempted)
            }
        };
        let previous = self.reported.get(&a.name);
        status.last_transition_time = match previous {
            Some(p) if p.phase == status.phase && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(now_rfc3339()),
        };
        if let Some(run) = self.running.get_mut(&a.name) {
            if outcome != Outcome::KeptPrevious {
                run.status.last_transition_time = status.last_transition_time.clone();
            }
        }
        self.reported.insert(a.name.clone(), status.clone());
        let duration = start.elapsed();
        info!(
            program = %a.name,
            generation = a.generation,
            phase = ?status.phase,
            variant = status.variant.as_deref().unwrap_or("-"),
            ms = duration.as_secs_f64() * 1e3,
            "{}",
            status.message
        );
        Applied {
            status,
            outcome,
            duration,
            fallback_duration,
            fallbacks,
        }
    }

    /// Tries the candidates in order. Err: the fallbacks recorded and, when nothing
    /// was tried, why.
    fn attempt(
        &mut self,
        a: &ProgramAssignment,
        digest: &str,
        fetch: &dyn Fn(&Bytecode) -> Result<Vec<u8>, FetchError>,
    ) -> Result<Success, (Vec<FallbackRecord>, Option<String>)> {
        let config = parse_config(a).map_err(|e| (Vec::new(), Some(e)))?;
        if a.candidates.is_empty() {
            return Err((Vec::new(), Some("no candidate variant assigned".to_owned())));
        }
        let program_dir = self.program_dir(&a.name);
        let dir = program_dir.join(digest);
        let setup = pins::remove_dir(&dir)
            .and_then(|()| fs::create_dir_all(&program_dir))
            .and_then(|()| fs::create_dir(&dir));
        if let Err(e) = setup {
            return Err((Vec::new(), Some(format!("creating {}: {e}", dir.display()))));
        }
        let previous = self
            .running
            .get(&a.name)
            .map(|r| (r.info.pin_dir.clone(), r.info.links.clone()));
        let mut fallbacks = Vec::new();
        let mut first_failure = None;
        for (index, variant) in a.candidates.iter().enumerate() {
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.try_candidate(a, index, &config, &dir, previous.as_ref(), fetch)
            }));
            let failure = match result {
                Ok(Ok(success)) => {
                    return Ok(Success {
                        earlier: fallbacks,
                        since_first_failure: first_failure.map(|t: Instant| t.elapsed()),
                        ..success
                    })
                }
                Ok(Err(f)) => f,
                Err(panic) => Failure::new(
                    FallbackStage::Verify,
                    format!(
                        "loading panicked (a bug; reported as a rejection): {}",
                        object::panic_message(&*panic)
                    ),
                ),
            };
            first_failure.get_or_insert_with(Instant::now);
            if let Err(e) = pins::empty_dir(&dir) {
                warn!(program = %a.name, "cleaning up a failed attempt: {e}");
            }
            let stop = a.fallback.on_verifier_reject == OnVerifierReject::Fail;
            let to = match a.candidates.get(index + 1) {
                Some(next) if !stop => next.name.clone(),
                _ => "none".to_owned(),
            };
            warn!(
                program = %a.name,
                variant = %variant.name,
                stage = %failure.stage,
                "candidate failed: {}",
                failure.reason
            );
            fallbacks.push(FallbackRecord {
                from: variant.name.clone(),
                to,
                stage: failure.stage,
                reason: failure.reason,
                verifier_log: failure.verifier_log,
            });
            if stop {
                break;
            }
        }
        if let Err(e) = pins::remove_dir(&dir) {
            warn!(program = %a.name, "removing {}: {e}", dir.display());
        }
        Err((fallbacks, None))
    }

    /// Detaches and unpins `name`; nothing of it is left. Removing a program that
    /// does not run is not an error.
    pub fn remove(&mut self, name: &str) -> Result<(), LoaderError> {
        if let Some(old) = self.running.remove(name) {
            drop(old.counters);
        }
        self.reported.remove(name);
        let dir = self.program_dir(name);
        pins::remove_program_dir(&dir).map_err(io_error(&dir))
    }

    /// Removes everything under `bpffs_root` (for `bpfpoly-agent cleanup`): every
    /// program is detached and unpinned. Returns the number of program directories.
    pub fn cleanup_all(bpffs_root: &Path) -> Result<usize, LoaderError> {
        let entries = match fs::read_dir(bpffs_root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error(bpffs_root)(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let path = entry.map_err(io_error(bpffs_root))?.path();
            if path.is_dir() {
                pins::remove_program_dir(&path).map_err(io_error(&path))?;
                removed += 1;
            } else {
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        // The root is the agent's own (created at start): once it holds nothing more, it goes
        // too, so a stopped bpfpoly leaves nothing under /sys/fs/bpf.
        fs::remove_dir(bpffs_root).map_err(io_error(bpffs_root))?;
        Ok(removed)
    }
}
