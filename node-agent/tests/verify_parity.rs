#![allow(clippy::unwrap_used)]
//! Loader parity with libbpf on this kernel: every object in `ebpf/build/` and every
//! object of the parity corpus (tests/fixtures/parity/*.c and the kconfig fixture,
//! built here with clang as an outsider would) goes through `bpftool prog loadall`
//! (libbpf) and `bpfpoly-agent verify` (the agent's loader). The test fails where
//! libbpf loads a program and bpfpoly does not, and where libbpf names a program it
//! refused that bpfpoly loads (loadall is all-or-nothing: it stops at the first
//! program the kernel refuses, so that one is the only refusal libbpf reports).

mod loader_support;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use serde_json::Value;

#[path = "../../test-support/outsider_clang.rs"]
mod outsider_clang;
use outsider_clang::build;

const BIN: &str = env!("CARGO_BIN_EXE_bpfpoly-agent");

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What libbpf did with one object.
struct Libbpf {
    loaded: Option<Vec<String>>,
    /// The program libbpf names as refused, if any.
    refused: Vec<String>,
    log: String,
}

fn bpftool_loadall(object: &Path, pin: &Path) -> Libbpf {
    let _ = fs::remove_dir_all(pin);
    let o = Command::new("bpftool")
        .args(["-d", "prog", "loadall"])
        .arg(object)
        .arg(pin)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    let loaded = o.status.success().then(|| {
        let mut names: Vec<String> = fs::read_dir(pin)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    });
    let _ = fs::remove_dir_all(pin);
    let refused = log
        .lines()
        .filter_map(|l| l.split_once("prog '"))
        .filter_map(|(_, rest)| rest.split_once("': failed to load"))
        .map(|(name, _)| name.to_owned())
        .collect();
    Libbpf {
        loaded,
        refused,
        log,
    }
}

/// `bpfpoly-agent verify -o json`: program name → (verified, reason).
fn bpfpoly_verify(object: &Path) -> BTreeMap<String, (bool, String)> {
    let o = Command::new(BIN)
        .arg("verify")
        .arg(object)
        .args(["-o", "json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify {}: no JSON report ({e}); stderr: {}",
            object.display(),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let programs: BTreeMap<String, (bool, String)> = report["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                (
                    p["result"] == "verified",
                    p["reason"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect();
    let all = programs.values().all(|(ok, _)| *ok);
    assert_eq!(
        o.status.success(),
        all,
        "verify exits 0 exactly when every program verified: {}",
        object.display()
    );
    programs
}

fn corpus(dir: &Path) -> Vec<PathBuf> {
    let mut objects: Vec<PathBuf> = fs::read_dir(manifest().join("../ebpf/build"))
        .expect("ebpf/build (built by build.rs)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "o"))
        .collect();
    let mut sources: Vec<PathBuf> = fs::read_dir(manifest().join("tests/fixtures/parity"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.push(manifest().join("tests/fixtures/kconfig/kconfig_externs.c"));
    for source in sources {
        let out = dir.join(source.with_extension("o").file_name().unwrap());
        build(&source, &out);
        objects.push(out);
    }
    objects.sort();
    objects
}

/// libbpf refuses an object with an unresolved strong extern before any program: bpfpoly
/// must refuse every program, naming it. Returns the programs that agreed, and whether
/// libbpf named any such extern.
fn refused_for_unresolved_externs(
    name: &str,
    log: &str,
    ours: &BTreeMap<String, (bool, String)>,
    problems: &mut Vec<String>,
) -> (usize, bool) {
    let unresolved: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("(strong): not resolved"))
        .filter_map(|l| l.split('\'').nth(1))
        .collect();
    let mut agreed = 0;
    for ext in &unresolved {
        for (program, (ok, reason)) in ours {
            if *ok || !reason.contains(ext) {
                problems.push(format!(
                    "{name}: libbpf did not resolve extern {ext}; bpfpoly {} {program} ({reason})",
                    if *ok {
                        "loaded"
                    } else {
                        "refused without naming it:"
                    }
                ));
            } else {
                agreed += 1;
            }
        }
    }
    (agreed, !unresolved.is_empty())
}

#[test]
fn verify_agrees_with_libbpf_program_by_program() {
    require_privileges!();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("verify_parity");
    fs::create_dir_all(&dir).unwrap();
    let objects = corpus(&dir);
    let mut problems = Vec::new();
    let mut table = String::new();
    let (mut agreed, mut beyond) = (0, 0);
    for (n, object) in objects.iter().enumerate() {
        let name = object.file_name().unwrap().to_string_lossy().into_owned();
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/bpfpoly-verify-parity-{}-{n}",
            std::process::id()
        ));
        let libbpf = bpftool_loadall(object, &pin);
        let start = Instant::now();
        let ours = bpfpoly_verify(object);
        let ms = start.elapsed().as_millis();
        match &libbpf.loaded {
            Some(loaded) => {
                let ours_names: Vec<&String> = ours.keys().collect();
                if loaded.iter().collect::<Vec<_>>() != ours_names {
                    problems.push(format!(
                        "{name}: libbpf's programs {loaded:?}, bpfpoly's {ours_names:?}"
                    ));
                }
                for program in loaded {
                    match ours.get(program) {
                        Some((true, _)) => agreed += 1,
                        Some((false, reason)) => problems.push(format!(
                            "{name}: libbpf loads {program}, bpfpoly refused it: {reason}"
                        )),
                        None => {}
                    }
                }
                table.push_str(&format!(
                    "{name}: libbpf loads all {} program(s); bpfpoly verified {} ({ms} ms)\n",
                    loaded.len(),
                    ours.values().filter(|(ok, _)| *ok).count()
                ));
            }
            None => {
                for program in &libbpf.refused {
                    match ours.get(program) {
                        Some((false, _)) => agreed += 1,
                        Some((true, _)) => problems.push(format!(
                            "{name}: libbpf refused {program}, bpfpoly loaded it\n{}",
                            libbpf.log
                        )),
                        None => problems.push(format!(
                            "{name}: libbpf refused {program}, which bpfpoly does not list"
                        )),
                    }
                }
                let (named, unresolved) =
                    refused_for_unresolved_externs(&name, &libbpf.log, &ours, &mut problems);
                agreed += named;
                if libbpf.refused.is_empty() && !unresolved {
                    // libbpf refused the object before any program (e.g. a section
                    // name this libbpf does not know).
                    beyond += ours.values().filter(|(ok, _)| *ok).count();
                }
                let why = libbpf
                    .log
                    .lines()
                    .find(|l| l.contains("failed") || l.contains("Error"))
                    .unwrap_or("")
                    .trim();
                table.push_str(&format!(
                    "{name}: libbpf refuses the object ({why}); bpfpoly verified {} of {} ({ms} ms)\n",
                    ours.values().filter(|(ok, _)| *ok).count(),
                    ours.len()
                ));
            }
        }
    }
    eprintln!("{table}agreed on {agreed} program(s); {beyond} loaded by bpfpoly where this libbpf refused the object");
    fs::write(dir.join("parity.txt"), &table).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        agreed >= 20,
        "the corpus should exercise many programs, agreed on {agreed}"
    );
}
