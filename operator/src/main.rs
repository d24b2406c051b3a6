//! `bpfpoly-operator`: the cluster-side half of bpfpoly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// bpfpoly operator: checks every node's kernel before rolling polymorphic eBPF programs out.
#[derive(Parser)]
#[command(name = "bpfpoly-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: per-node variant selection, rollout waves, status and Events.
    Run {
        /// Kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Address for /metrics, /healthz and /readyz (`:9465` means all interfaces).
        #[arg(long, default_value = ":9465")]
        metrics_addr: String,
        /// Do not take the Lease (only safe with a single replica).
        #[arg(long)]
        no_leader_election: bool,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "bpfpoly-operator")]
        lease_name: String,
        /// Lease duration in seconds; a standby takes over within it.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
        /// This replica's identity (default: hostname and PID).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds deletion waits for agents to unload before giving up with an Event.
        #[arg(long, default_value_t = 60)]
        unload_timeout: u64,
        /// Seconds after which a node whose agent has not renewed its liveness Lease
        /// (`<node-lease-namespace>/bpfpoly-agent-<node>`, renewed every 5 s by default) is
        /// lost: its last report no longer counts as running, status says why and since when,
        /// and an Event is published. 0 turns liveness tracking off.
        #[arg(long, value_name = "SECONDS", default_value_t = bpfpoly_operator::liveness::DEFAULT_NODE_LOST_AFTER_SECS)]
        node_lost_after: u64,
        /// Namespace of the agents' liveness Leases.
        #[arg(long, default_value = bpfpoly_crds::state::NODE_LEASE_NAMESPACE)]
        node_lease_namespace: String,
    },
    /// Check BpfPolyProgram YAML files offline (multi-document); print every problem with its
    /// field path. Exits 1 if any document is invalid. `-` reads standard input.
    Validate {
        /// YAML files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Explain which variant each node or kernel gets, and why.
    ///
    /// In the cluster: `explain NAME [--node N]` reads the program, the nodes' profiles and
    /// what their agents reported.
    ///
    /// Offline, before a rollout: `explain --program FILE --profile FILE...` or
    /// `explain --program FILE --btf-path FILE --kernel-release R` decides every program of
    /// FILE on every kernel given, with the operator's own selection; BTF is answered by
    /// `bpfpoly-agent profile`. For another kernel's BTF, program types, map types and
    /// helpers are read from its BTF enums (said on every such line), not probed.
    #[command(verbatim_doc_comment)]
    Explain {
        /// BpfPolyProgram name (in-cluster form).
        #[arg(
            required_unless_present = "program_files",
            conflicts_with = "program_files"
        )]
        program: Option<String>,
        /// Only this node (in-cluster form).
        #[arg(long, conflicts_with = "program_files")]
        node: Option<String>,
        /// Kubeconfig file (in-cluster form).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Program YAML file(s) to explain offline (multi-document; repeatable).
        #[arg(long = "program", value_name = "FILE", id = "program_files")]
        program_files: Vec<PathBuf>,
        /// A kernel as a profile: `bpfpoly-agent profile` JSON or `kubectl get bnp NODE -o json` (repeatable).
        #[arg(long = "profile", value_name = "FILE", requires = "program_files")]
        profiles: Vec<PathBuf>,
        /// A kernel as its raw BTF (e.g. /sys/kernel/btf/vmlinux, or extracted from a vmlinux).
        #[arg(long, value_name = "FILE", requires = "program_files")]
        btf_path: Option<PathBuf>,
        /// The release of the kernel --btf-path belongs to (needed unless it is the running one's).
        #[arg(long, value_name = "R", requires = "btf_path")]
        kernel_release: Option<String>,
        /// The agent binary that answers --btf-path (default: beside this binary, then $PATH).
        #[arg(long, value_name = "PATH")]
        agent_bin: Option<PathBuf>,
        /// Output: `text` (default) or `json` (offline form; stable, see the README).
        #[arg(short = 'o', long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Delete every BpfPolyProgram and wait until all are gone: their finalizer unloads them
    /// from every node first. The chart's pre-delete hook runs this on `helm uninstall`.
    UnloadAll {
        /// Kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Seconds to wait for the programs to go before failing (naming those left).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
}

/// Parses `:9465` or `127.0.0.1:9465`.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|e| format!("--metrics-addr {s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Crdgen => match bpfpoly_crds::crds_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Explain {
            program: None,
            program_files,
            profiles,
            btf_path,
            kernel_release,
            agent_bin,
            output,
            ..
        } => explain_offline(
            &program_files,
            profiles,
            btf_path,
            kernel_release,
            agent_bin,
            &output,
        ),
        Command::Explain {
            program: Some(program),
            node,
            kubeconfig,
            ..
        } => with_client(kubeconfig, |client| async move {
            let text = bpfpoly_operator::explain::explain(&client, &program, node.as_deref())
                .await
                .map_err(|e| format!("explain {program}: {e}"))?;
            print!("{text}");
            Ok(())
        }),
        Command::UnloadAll {
            kubeconfig,
            timeout,
        } => with_client(kubeconfig, |client| async move {
            bpfpoly_operator::unload::unload_all(&client, Duration::from_secs(timeout))
                .await
                .map(|_| ())
        }),
        Command::Run {
            kubeconfig,
            metrics_addr,
            no_leader_election,
            lease_namespace,
            lease_name,
            lease_seconds,
            identity,
            unload_timeout,
            node_lost_after,
            node_lease_namespace,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let metrics_addr = match parse_addr(&metrics_addr) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let opts = bpfpoly_operator::run::Options {
                kubeconfig,
                metrics_addr,
                leader_election: !no_leader_election,
                lease_namespace,
                lease_name,
                lease_duration: Duration::from_secs(lease_seconds),
                identity: identity
                    .unwrap_or_else(|| format!("{}-{}", host.trim(), std::process::id())),
                unload_timeout: Duration::from_secs(unload_timeout),
                node_lost_after: Duration::from_secs(node_lost_after),
                node_lease_namespace,
            };
            block_on(async move {
                bpfpoly_operator::run::run(opts)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    }
}

fn explain_offline(
    programs: &[PathBuf],
    profiles: Vec<PathBuf>,
    btf_path: Option<PathBuf>,
    kernel_release: Option<String>,
    agent_bin: Option<PathBuf>,
    output: &str,
) -> ExitCode {
    use bpfpoly_operator::preflight;
    let mut inputs: Vec<preflight::KernelInput> = profiles
        .into_iter()
        .map(preflight::KernelInput::Profile)
        .collect();
    if let Some(path) = btf_path {
        inputs.push(preflight::KernelInput::Btf {
            path,
            release: kernel_release,
        });
    }
    if inputs.is_empty() {
        eprintln!(
            "error: explain --program needs at least one kernel: --profile FILE or --btf-path FILE"
        );
        return ExitCode::from(2);
    }
    let agent = agent_bin.unwrap_or_else(default_agent_bin);
    let result = preflight::read_programs(programs).and_then(|progs| {
        let kernels = preflight::kernels(&inputs, &agent, &progs)?;
        Ok(preflight::report(&progs, &kernels))
    });
    match result {
        Ok(report) if output == "json" => match serde_json::to_string_pretty(&report) {
            Ok(j) => {
                println!("{j}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{}", preflight::render(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `bpfpoly-agent` beside this binary (as the image and `target/` lay them out), else on $PATH.
fn default_agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("bpfpoly-agent")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("bpfpoly-agent"))
}

/// Runs `f` with a client from `kubeconfig` (or the default chain) on a new runtime.
fn with_client<F, Fut>(kubeconfig: Option<PathBuf>, f: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    block_on(async move {
        let client = bpfpoly_runtime::client(kubeconfig.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        f(client).await
    })
}

fn block_on(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut bad = 0usize;
    let mut checked = 0usize;
    for file in files {
        let text = if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
        } else {
            read_bounded(file)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", file.display());
                bad += 1;
                continue;
            }
        };
        let reports = bpfpoly_crds::document::check_stream(&text);
        if reports.is_empty() {
            eprintln!("{}: no documents", file.display());
            bad += 1;
        }
        for r in reports {
            checked += 1;
            let at = format!("{}: {} (document {})", file.display(), r.object, r.index);
            for w in &r.warnings {
                eprintln!("{at}: warning: {w}");
            }
            if r.errors.is_empty() {
                println!("{at}: valid");
            } else {
                bad += 1;
                for e in &r.errors {
                    eprintln!("{at}: {e}");
                }
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} invalid of {checked} document(s)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn read_bounded(path: &PathBuf) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let limit = bpfpoly_crds::document::MAX_DOCUMENT_BYTES as u64;
    if meta.len() > limit {
        return Err(std::io::Error::other(format!(
            "{} bytes is above the {limit}-byte limit",
            meta.len()
        )));
    }
    std::fs::read_to_string(path)
}
