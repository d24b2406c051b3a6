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
    },
    /// Check BpfPolyProgram YAML files offline (multi-document); print every problem with its
    /// field path. Exits 1 if any document is invalid. `-` reads standard input.
    Validate {
        /// YAML files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Explain, from the cluster, which variant each node chose and why.
    Explain {
        /// BpfPolyProgram name.
        program: String,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Kubeconfig file.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
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
            program,
            node,
            kubeconfig,
        } => block_on(async move {
            let client = bpfpoly_operator::run::client(kubeconfig.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            let text = bpfpoly_operator::explain::explain(&client, &program, node.as_deref())
                .await
                .map_err(|e| format!("explain {program}: {e}"))?;
            print!("{text}");
            Ok(())
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
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube_lease_manager=warn".into()),
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
            };
            block_on(async move {
                bpfpoly_operator::run::run(opts)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    }
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
            if r.errors.is_empty() {
                println!(
                    "{}: {} (document {}): valid",
                    file.display(),
                    r.object,
                    r.index
                );
            } else {
                bad += 1;
                for e in &r.errors {
                    eprintln!(
                        "{}: {} (document {}): {e}",
                        file.display(),
                        r.object,
                        r.index
                    );
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
