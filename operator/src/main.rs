//! `bpfpoly-operator`: the cluster-side half of bpfpoly.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Check BpfPolyProgram YAML files offline (multi-document); print every problem with its
    /// field path. Exits 1 if any document is invalid. `-` reads standard input.
    Validate {
        /// YAML files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
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
