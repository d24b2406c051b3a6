//! `bpfpoly-operator explain --program FILE` with no cluster: the samples decided on Debian
//! 6.1's real BTF (fetched by `make deps`) and on this machine's running kernel, through the
//! real `bpfpoly-agent profile`. The same program gets different variants and config values
//! on the two kernels, with exact traces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cache() -> PathBuf {
    std::env::var_os("BPFPOLY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/bpfpoly"))
}

/// `bpfpoly-agent` from the same build as this test (`cargo test --workspace` builds it).
fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("bpfpoly-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p bpfpoly-agent, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// Debian 6.1's BTF and release, as `make deps` caches them.
fn debian_61() -> (PathBuf, String) {
    let btf = cache().join("btf/debian-6.1-cloud.btf");
    let release = cache().join("btf/debian-6.1-cloud.release");
    assert!(
        btf.is_file() && release.is_file(),
        "{} is missing: run `make deps` (e2e/env/fetch-btf.sh)",
        btf.display()
    );
    (
        btf,
        std::fs::read_to_string(release).unwrap().trim().to_string(),
    )
}

fn explain(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bpfpoly-operator"))
        .arg("explain")
        .args(args)
        .arg("--agent-bin")
        .arg(agent_bin())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sample(name: &str) -> String {
    repo()
        .join("crds/examples")
        .join(name)
        .display()
        .to_string()
}

/// The probes of the running kernel need BPF: fail loudly without it, unless told to skip.
fn privileged() -> bool {
    if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("BPFPOLY_SKIP_PRIVILEGED=1: skipping the running-kernel half");
        return false;
    }
    assert!(
        euid_is_root(),
        "explaining on the running kernel probes it and needs root (or BPFPOLY_SKIP_PRIVILEGED=1)"
    );
    true
}

fn euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

#[test]
fn debian_61_btf_gets_its_own_variants_and_config_with_exact_traces() {
    let (btf, release) = debian_61();
    let btf = btf.display().to_string();
    let (code, out, err) = explain(&[
        "--program",
        &sample("exec-tracer.yaml"),
        "--program",
        &sample("config-fallback.yaml"),
        "--btf-path",
        &btf,
        "--kernel-release",
        &release,
    ]);
    assert_eq!(code, 0, "{err}");
    let v = format!("kernel is 6.1.0 ({release})");
    for line in [
        format!("kernel {release} ({btf}; program types, map types and helpers: btf-enums)"),
        "  program exec-tracer: runs variant kprobe".to_string(),
        format!("    eligible kprobe: kernel >=5.8 {v}; program type kprobe in this kernel's enum bpf_prog_type (BTF, not probed)"),
        format!("    eligible tp-btf: kernel >=5.5 {v}; btf available; type struct linux_binprm present"),
        "    eligible tracepoint: no requirements".to_string(),
        "    config use_ringbuf = true".to_string(),
        "    config read_loginuid = true".to_string(),
        "  program classifier-config-fallback: runs variant tc-legacy".to_string(),
        format!("    rejected xdp-modern: kernel >=6.6 {v}"),
        format!("    config count_bytes = false (fallback: kernel >=6.6 {v})"),
    ] {
        assert!(out.lines().any(|l| l == line), "missing line {line:?} in:\n{out}");
    }
    // Features of another kernel are never the host's probes.
    assert!(!out.contains("(probed)"), "{out}");
    assert!(!out.contains("probe inconclusive"), "{out}");
}

#[test]
fn json_carries_the_same_decisions_as_the_text() {
    let (btf, release) = debian_61();
    let btf = btf.display().to_string();
    let args = [
        "--program",
        &sample("packet-classifier.yaml"),
        "--btf-path",
        &btf,
        "--kernel-release",
        &release,
    ];
    let (code, text, err) = explain(&args);
    assert_eq!(code, 0, "{err}");
    let (code, json, err) = explain(&[&args[..], &["-o", "json"]].concat());
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let k = &j["kernels"][0];
    assert_eq!(k["release"], release);
    assert_eq!(k["features"], "btf-enums");
    let p = &k["programs"][0];
    assert_eq!(p["name"], "packet-classifier");
    assert_eq!(p["outcome"], "eligible");
    assert_eq!(p["firstChoice"], "xdp-freplace");
    let eligible: Vec<&str> = p["eligible"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["variant"].as_str().unwrap())
        .collect();
    assert_eq!(eligible, ["xdp-freplace", "xdp-tailcall", "tc"]);
    // Every trace line of the JSON is in the text, in the text's words.
    for e in p["eligible"].as_array().unwrap() {
        let trace: Vec<String> = e["trace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["requirement"].as_str().unwrap(),
                    c["fact"].as_str().unwrap()
                )
            })
            .collect();
        let line = format!(
            "    eligible {}: {}",
            e["variant"].as_str().unwrap(),
            trace.join("; ")
        );
        assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
    }
    for c in p["config"].as_array().unwrap() {
        let line = format!(
            "    config {} = {}",
            c["name"].as_str().unwrap(),
            c["value"].as_str().unwrap()
        );
        assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
    }
}

#[test]
fn the_running_kernel_and_debian_61_choose_differently() {
    if !privileged() {
        return;
    }
    let (btf, release) = debian_61();
    let (code, json, err) = explain(&[
        "--program",
        &sample("config-fallback.yaml"),
        "--btf-path",
        "/sys/kernel/btf/vmlinux",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let here: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (code, json, err) = explain(&[
        "--program",
        &sample("config-fallback.yaml"),
        "--btf-path",
        btf.to_str().unwrap(),
        "--kernel-release",
        &release,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let old: serde_json::Value = serde_json::from_str(&json).unwrap();
    let here_p = &here["kernels"][0]["programs"][0];
    let old_p = &old["kernels"][0]["programs"][0];
    assert_eq!(here["kernels"][0]["features"], "probed");
    // This host (6.18) has struct bpf_iter_num and kernel >= 6.6; 6.1 has neither.
    assert_eq!(here_p["firstChoice"], "xdp-modern", "{here_p}");
    assert_eq!(old_p["firstChoice"], "tc-legacy", "{old_p}");
    let count_bytes = |p: &serde_json::Value| {
        p["config"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "count_bytes")
            .map(|c| {
                (
                    c["value"].as_str().unwrap().to_string(),
                    c["fellBack"].as_bool().unwrap(),
                )
            })
            .unwrap()
    };
    assert_eq!(count_bytes(here_p), ("true".to_string(), false));
    assert_eq!(count_bytes(old_p), ("false".to_string(), true));
}

#[test]
fn a_profile_without_the_needed_answers_says_pending_not_false() {
    let dir = std::env::temp_dir().join(format!("bpfpoly-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("profile.json");
    // A profile as `bpfpoly-agent profile` prints it, answering no query.
    std::fs::write(
        &profile,
        r#"{"kernel": {"release": "5.10.0-32-cloud-amd64", "version": "5.10.0"}, "arch": "x86_64",
            "btf": {"available": true, "source": "/sys/kernel/btf/vmlinux", "sha256": "x", "types": 1},
            "programTypes": ["kprobe", "tracepoint", "tracing"], "mapTypes": ["ringbuf"], "answers": {},
            "btfIsRunningKernel": true}"#,
    )
    .unwrap();
    let (code, out, err) = explain(&[
        "--program",
        &sample("exec-tracer.yaml"),
        "--profile",
        profile.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  program exec-tracer: pending: some facts have no answer"),
        "{out}"
    );
    assert!(
        out.contains("    pending: no answer for field:struct task_struct.loginuid"),
        "{out}"
    );
    assert!(
        out.contains("    pending: no answer for type:struct linux_binprm"),
        "{out}"
    );
    assert!(!out.contains("missing on this kernel"), "{out}");
}

#[test]
fn bad_inputs_fail_clearly() {
    let (code, _, err) = explain(&[
        "--program",
        "/nonexistent.yaml",
        "--profile",
        "/nonexistent.json",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.yaml: cannot read"), "{err}");
    let (code, _, err) = explain(&["--program", &sample("exec-tracer.yaml")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs at least one kernel"), "{err}");
    let invalid = repo().join("crds/examples/invalid/04-path-without-sha256.yaml");
    let (code, _, err) = explain(&[
        "--program",
        invalid.to_str().unwrap(),
        "--profile",
        "/nonexistent.json",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("spec.variants[0].bytecode.sha256"), "{err}");
    let (btf, _) = debian_61();
    let (code, _, err) = explain(&[
        "--program",
        &sample("exec-tracer.yaml"),
        "--btf-path",
        btf.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("pass --kernel-release"), "{err}");
}

/// The kernel-matrix kernels' BTF (`e2e/kernels/fetch.sh`: `kernels/<NAME>/vmlinux.btf` and
/// `release` in the cache). `make kernels` fetches them first and sets
/// `BPFPOLY_REQUIRE_KERNELS=1`, so there a missing kernel fails; a plain `cargo test` before
/// any fetch covers the ones present and says which.
#[test]
fn each_matrix_kernel_gets_the_variants_its_btf_allows() {
    // (kernel, classifier-config-fallback's first choice, count_bytes fell back)
    let expected = [
        ("5.10", "tc-legacy", true),
        ("6.1", "tc-legacy", true),
        ("6.12", "xdp-modern", false),
        ("7.2", "xdp-modern", false),
    ];
    let require = std::env::var("BPFPOLY_REQUIRE_KERNELS").as_deref() == Ok("1");
    let mut covered = Vec::new();
    for (name, first, fell_back) in expected {
        let dir = cache().join("kernels").join(name);
        let (btf, release) = (dir.join("vmlinux.btf"), dir.join("release"));
        if !btf.is_file() || !release.is_file() {
            assert!(
                !require,
                "{} is missing: run `bash e2e/kernels/fetch.sh {name}`",
                btf.display()
            );
            continue;
        }
        let release = std::fs::read_to_string(&release)
            .unwrap()
            .trim()
            .to_string();
        let (code, json, err) = explain(&[
            "--program",
            &sample("config-fallback.yaml"),
            "--program",
            &sample("exec-tracer.yaml"),
            "--program",
            &sample("packet-classifier.yaml"),
            "--btf-path",
            btf.to_str().unwrap(),
            "--kernel-release",
            &release,
            "-o",
            "json",
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        let j: serde_json::Value = serde_json::from_str(&json).unwrap();
        let programs = &j["kernels"][0]["programs"];
        let by_name = |n: &str| {
            programs
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == n)
                .unwrap_or_else(|| panic!("{name}: no {n} in {json}"))
                .clone()
        };
        let cf = by_name("classifier-config-fallback");
        assert_eq!(cf["firstChoice"], first, "{name}: {cf}");
        let count_bytes = cf["config"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "count_bytes")
            .unwrap()
            .clone();
        assert_eq!(count_bytes["fellBack"], fell_back, "{name}: {count_bytes}");
        let tracer = by_name("exec-tracer");
        assert_eq!(tracer["firstChoice"], "kprobe", "{name}: {tracer}");
        let classifier = by_name("packet-classifier");
        assert_eq!(
            classifier["firstChoice"], "xdp-freplace",
            "{name}: {classifier}"
        );
        covered.push(format!("{name} ({release})"));
    }
    println!(
        "explain covered the matrix kernels: {}",
        if covered.is_empty() {
            "none cached yet".to_string()
        } else {
            covered.join(", ")
        }
    );
}
