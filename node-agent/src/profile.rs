//! The node profile (`BpfNodeProfile.status`): kernel release, BTF facts and
//! feature probes, with the answers to the operator's queries.
//!
//! `build_profile` is pure: it turns parsed BTF and probe results into the
//! status. `profile_node` does the I/O around it (uname, the BTF file, the
//! probes, which run on a second thread while the BTF is parsed; the BTF is parsed
//! once, and the probes that need the running kernel's BTF use that parse).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bpfpoly_crds::{
    profile::{BtfInfo, KernelInfo},
    requirement::{KernelVersion, Query},
    BpfNodeProfileStatus,
};
use serde::Serialize;

use crate::{
    btf::{BtfError, KernelBtf, VMLINUX_BTF},
    probe::{self, AttachTargets, Probed},
};

/// Where `uname -r` lives without a syscall wrapper.
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// What to profile.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// The BTF file, usually `/sys/kernel/btf/vmlinux`.
    pub btf_path: PathBuf,
    /// Size limit for the BTF file.
    pub max_btf_bytes: u64,
    /// Kernel release to report instead of the running one (when `btf_path` is
    /// another kernel's BTF).
    pub kernel_release: Option<String>,
    /// Queries to answer (`BpfNodeProfile.spec.queries`).
    pub queries: Vec<Query>,
}

/// The profile and how it was made: the published status plus provenance.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeProfile {
    /// What the agent publishes as `BpfNodeProfile.status`.
    #[serde(flatten)]
    pub status: BpfNodeProfileStatus,
    /// Probes (program types, map types, `helper:` answers) always run against
    /// the running kernel, whatever BTF was read.
    pub probes_from: String,
    /// Whether the BTF read is the running kernel's (same bytes).
    pub btf_is_running_kernel: bool,
    /// What the probes or the queries could not decide, and why.
    pub notes: Vec<String>,
    /// How long the parts took.
    pub timings: Timings,
}

/// Durations in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Read, hash and parse (with name index) of the BTF file.
    pub btf_ms: f64,
    /// Program type, map type and helper probes.
    pub probes_ms: f64,
    /// The whole profile (BTF and probes run in parallel).
    pub total_ms: f64,
}

/// Why no profile could be made.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The BTF file could not be used.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// The running kernel's release could not be read.
    #[error("cannot read the kernel release from {OSRELEASE}: {0}")]
    Release(io::Error),
    /// `--kernel-release` is not a kernel release.
    #[error("invalid kernel release: {0}")]
    BadRelease(String),
}

/// `uname -r` of the running kernel.
pub fn running_release() -> io::Result<String> {
    Ok(fs::read_to_string(OSRELEASE)?.trim().to_string())
}

/// Profiles this node: parses the BTF while the probes run, then builds the status.
pub fn profile_node(opts: &ProfileOptions) -> Result<NodeProfile, ProfileError> {
    profile_node_with_btf(opts).map(|(profile, _)| profile)
}

/// [`profile_node`], also returning the parsed BTF, to answer later queries
/// without reading and parsing it again.
pub fn profile_node_with_btf(
    opts: &ProfileOptions,
) -> Result<(NodeProfile, KernelBtf), ProfileError> {
    let start = Instant::now();
    let running = running_release().map_err(ProfileError::Release)?;
    let release = opts
        .kernel_release
        .clone()
        .unwrap_or_else(|| running.clone());
    let mut notes = Vec::new();
    if let Err(e) = KernelVersion::from_release(&release) {
        if opts.kernel_release.is_some() {
            return Err(ProfileError::BadRelease(e));
        }
        notes.push(e);
    }

    // The probes run on a second thread while this one reads and indexes the BTF.
    // Of the probes, only tracing and lsm need the running kernel's BTF (their attach
    // targets' ids): they run last and take the ids from this parse when the file is
    // the running kernel's. For another kernel's BTF, a third thread reads the
    // running kernel's once, for those ids and to compare the two.
    let btf_is_vmlinux = is_vmlinux(&opts.btf_path);
    let (targets_tx, targets_rx) = std::sync::mpsc::channel();
    let (btf, btf_time, probed, running_sha256) = std::thread::scope(|s| {
        // The probe thread may not ask (without CAP_BPF it stops early).
        let probes = s.spawn(move || {
            probe::probe_all(&opts.queries, || targets_rx.recv().unwrap_or_default())
        });
        let running_btf = (!btf_is_vmlinux).then(|| {
            let targets_tx = targets_tx.clone();
            s.spawn(move || {
                let vmlinux = KernelBtf::load(Path::new(VMLINUX_BTF)).ok();
                let targets = vmlinux.as_ref().map(AttachTargets::from_btf);
                let _ = targets_tx.send(targets.unwrap_or_default());
                vmlinux.map(|b| b.sha256().to_string())
            })
        });
        let t = Instant::now();
        let btf = KernelBtf::load_with_limit(&opts.btf_path, opts.max_btf_bytes);
        let btf_time = t.elapsed();
        if btf_is_vmlinux {
            let targets = btf.as_ref().map(AttachTargets::from_btf);
            let _ = targets_tx.send(targets.unwrap_or_default());
        }
        drop(targets_tx);
        let running_sha256 = running_btf.and_then(|h| h.join().ok().flatten());
        let probed = probes.join().unwrap_or_else(|_| Probed {
            notes: vec!["feature probes failed: the probe thread panicked".to_string()],
            ..Probed::default()
        });
        (btf, btf_time, probed, running_sha256)
    });
    let btf = btf?;

    let btf_is_running_kernel = btf_is_vmlinux || running_sha256.as_deref() == Some(btf.sha256());
    if !btf_is_running_kernel {
        let kernel = match &opts.kernel_release {
            Some(r) => format!("kernel {r}"),
            None => format!(
                "a kernel other than the running one, though the release reported is the \
                 running {running}: pass --kernel-release"
            ),
        };
        notes.push(format!(
            "BTF answers are for {} ({kernel}); program types, map types and helper \
             answers are probed on the running kernel {running}",
            btf.source().display()
        ));
    }
    let (status, query_notes) = build_profile(Some(&btf), &release, &opts.queries, &probed);
    notes.extend(probed.notes.iter().cloned());
    notes.extend(query_notes);

    let profile = NodeProfile {
        status: BpfNodeProfileStatus {
            probed_at: Some(now_rfc3339()),
            ..status
        },
        probes_from: format!("running kernel {running}"),
        btf_is_running_kernel,
        notes,
        timings: Timings {
            btf_ms: ms(btf_time),
            probes_ms: ms(probed.duration),
            total_ms: ms(start.elapsed()),
        },
    };
    Ok((profile, btf))
}

/// Builds the status from parsed BTF (None when the node has none) and probe
/// results. Returns notes on queries that could not be decided (answered false).
/// `probedAt` is left for the caller, which knows when the probes ran.
pub fn build_profile(
    btf: Option<&KernelBtf>,
    release: &str,
    queries: &[Query],
    probed: &Probed,
) -> (BpfNodeProfileStatus, Vec<String>) {
    let mut notes = Vec::new();
    let mut answers = BTreeMap::new();
    for query in queries {
        let key = query.to_string();
        let answer = match query {
            Query::Helper { .. } => probed.helpers.get(&key).copied(),
            _ => btf.and_then(|b| b.answer(query)),
        };
        if answer.is_none() && btf.is_none() && !matches!(query, Query::Helper { .. }) {
            notes.push(format!("{key}: no BTF on this node; answered false"));
        }
        answers.insert(key, answer.unwrap_or(false));
    }
    let status = BpfNodeProfileStatus {
        kernel: KernelInfo {
            release: release.to_string(),
            version: KernelVersion::from_release(release)
                .map(|v| v.to_string())
                .unwrap_or_default(),
        },
        arch: std::env::consts::ARCH.to_string(),
        btf: match btf {
            Some(b) => BtfInfo {
                available: true,
                source: b.source().display().to_string(),
                sha256: b.sha256().to_string(),
                types: b.type_count(),
            },
            None => BtfInfo::default(),
        },
        program_types: probed.program_types.clone(),
        map_types: probed.map_types.clone(),
        observed_program_types: Vec::new(),
        answers,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        probed_at: None,
    };
    (status, notes)
}

/// `path` is the running kernel's BTF file itself.
fn is_vmlinux(path: &Path) -> bool {
    fs::canonicalize(path).ok().as_deref() == Some(Path::new(VMLINUX_BTF))
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        Query::parse(s).unwrap()
    }

    #[test]
    fn without_btf_every_btf_query_is_false_with_a_note() {
        let probed = Probed {
            program_types: vec!["xdp".into()],
            map_types: vec!["ringbuf".into()],
            helpers: [("helper:xdp:bpf_redirect".to_string(), true)].into(),
            ..Probed::default()
        };
        let queries = [q("type:struct task_struct"), q("helper:xdp:bpf_redirect")];
        let (status, notes) = build_profile(None, "6.1.0-54-cloud-amd64", &queries, &probed);
        assert!(!status.btf.available);
        assert_eq!(status.kernel.version, "6.1.0");
        assert!(!status.answers["type:struct task_struct"]);
        assert!(status.answers["helper:xdp:bpf_redirect"]);
        assert_eq!(status.program_types, ["xdp"]);
        assert_eq!(status.map_types, ["ringbuf"]);
        assert!(status.observed_program_types.is_empty());
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("no BTF"));
    }

    #[test]
    fn unprobed_helper_answers_false() {
        let (status, _) = build_profile(
            None,
            "6.18.0",
            &[q("helper:ext:bpf_map_lookup_elem")],
            &Probed::default(),
        );
        assert!(!status.answers["helper:ext:bpf_map_lookup_elem"]);
    }

    #[test]
    fn unparsable_release_keeps_the_string() {
        let (status, _) = build_profile(None, "weird", &[], &Probed::default());
        assert_eq!(status.kernel.release, "weird");
        assert_eq!(status.kernel.version, "");
    }

    #[test]
    fn timestamps_are_rfc3339_seconds() {
        let t = now_rfc3339();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
    }
}
