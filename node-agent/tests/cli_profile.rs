#![allow(clippy::unwrap_used)]
//! `bpfpoly-agent profile`: BTF answers on this kernel and on another kernel's
//! BTF, the digest and type count, hostile BTF files, and (privileged) probes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bpfpoly-agent");
const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `profile` and returns its JSON, failing with stderr when it fails.
fn profile(args: &[&str]) -> Value {
    let mut all = vec!["profile"];
    all.extend_from_slice(args);
    let out = agent(&all);
    assert!(out.status.success(), "profile {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn with_queries<'a>(btf: &'a str, queries: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--btf-path", btf];
    for q in queries {
        args.extend(["--query", q]);
    }
    args
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_profile");
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The cached BTF of Debian 12's 6.1 cloud kernel (`make deps` fetches it), or
/// None when privileged/cached tests are switched off. Missing is a failure.
fn debian_61_btf() -> Option<(PathBuf, String)> {
    let cache = std::env::var_os("BPFPOLY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/bpfpoly"));
    let btf = cache.join("btf/debian-6.1-cloud.btf");
    let release = cache.join("btf/debian-6.1-cloud.release");
    if !btf.exists() || !release.exists() {
        if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!(
                "skipped: {} is missing and BPFPOLY_SKIP_PRIVILEGED=1",
                btf.display()
            );
            return None;
        }
        panic!(
            "{} (or its .release) is missing: run `make deps` (e2e/env/fetch-btf.sh) to fetch \
             the Debian 6.1 kernel's BTF",
            btf.display()
        );
    }
    let release = fs::read_to_string(release).unwrap().trim().to_string();
    Some((btf, release))
}

/// Whether `bpftool btf dump` of `file` has a line containing `needle`.
fn bpftool_dump_has(file: &Path, needle: &str) -> bool {
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(file)
        .output()
        .expect("bpftool is needed to cross-check BTF answers: run `make deps`");
    assert!(out.status.success(), "bpftool: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).contains(needle)
}

#[test]
fn answers_btf_queries_on_this_kernel() {
    let queries = [
        "field:struct task_struct.loginuid",
        "field:struct task_struct.made_up_field_xyz",
        "type:struct task_struct",
        "type:struct made_up_struct_xyz",
        "type:typedef __u32",
        "enum:enum bpf_func_id.BPF_FUNC_ringbuf_output",
        "enum:enum bpf_func_id.BPF_FUNC_made_up",
        "func:do_sys_openat2",
        "func:made_up_function_xyz",
        // Nested anonymous unions/structs: sk_buff.dev is three levels down.
        "field:struct sk_buff.dev",
    ];
    let p = profile(&with_queries(VMLINUX, &queries));
    let answers = &p["answers"];
    let expect = [
        true, false, true, false, true, true, false, true, false, true,
    ];
    for (q, want) in queries.iter().zip(expect) {
        assert_eq!(answers[q], Value::Bool(want), "{q}");
    }
    assert_eq!(answers.as_object().unwrap().len(), queries.len());
    assert_eq!(p["btf"]["available"], true);
    assert_eq!(p["btf"]["source"], VMLINUX);
    assert_eq!(p["btfIsRunningKernel"], true);
    assert_eq!(p["observedProgramTypes"], Value::Array(vec![]));
    assert_eq!(p["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert!(p["probesFrom"]
        .as_str()
        .unwrap()
        .starts_with("running kernel "));
    assert!(p["probedAt"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn reports_type_count_and_sha256_of_the_file() {
    let p = profile(&["--btf-path", VMLINUX]);
    let types = p["btf"]["types"].as_u64().unwrap();
    assert!((100_000..160_000).contains(&types), "types = {types}");
    let sha = p["btf"]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    assert!(sha
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let sum = Command::new("sha256sum").arg(VMLINUX).output().unwrap();
    let expected = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(sha, expected.split_whitespace().next().unwrap());

    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(p["kernel"]["release"], release.trim());
    let version = p["kernel"]["version"].as_str().unwrap();
    assert!(
        release.starts_with(version.trim_end_matches(".0")),
        "{version}"
    );
    assert_eq!(p["arch"], std::env::consts::ARCH);
}

#[test]
fn another_kernels_btf_gives_its_own_answers() {
    let Some((btf, release)) = debian_61_btf() else {
        return;
    };
    let btf_str = btf.to_str().unwrap();
    // Added after 6.1: open-coded iterators (6.4) and cgroup storage helpers (6.2).
    let newer = [
        ("type:struct bpf_iter_num", "STRUCT 'bpf_iter_num'"),
        ("func:bpf_iter_num_new", "FUNC 'bpf_iter_num_new'"),
        (
            "enum:enum bpf_func_id.BPF_FUNC_cgrp_storage_get",
            "'BPF_FUNC_cgrp_storage_get'",
        ),
    ];
    let common = ["type:struct task_struct", "func:do_sys_openat2"];
    let queries: Vec<&str> = newer.iter().map(|(q, _)| *q).chain(common).collect();

    let mut args = with_queries(btf_str, &queries);
    args.extend(["--kernel-release", &release]);
    let old = profile(&args);
    let here = profile(&with_queries(VMLINUX, &queries));

    let types = old["btf"]["types"].as_u64().unwrap();
    assert!((85_000..105_000).contains(&types), "6.1 types = {types}");
    assert_eq!(old["kernel"]["release"], release.as_str());
    assert!(old["kernel"]["version"]
        .as_str()
        .unwrap()
        .starts_with("6.1."));
    assert_eq!(old["btfIsRunningKernel"], false);
    assert_ne!(old["btf"]["sha256"], here["btf"]["sha256"]);
    let notes = old["notes"].to_string();
    assert!(notes.contains("running kernel"), "{notes}");

    for (q, bpftool_line) in newer {
        assert_eq!(old["answers"][q], false, "{q} on 6.1");
        assert_eq!(here["answers"][q], true, "{q} on this kernel");
        // bpftool reads the same files the same way.
        assert!(
            !bpftool_dump_has(&btf, bpftool_line),
            "{bpftool_line} in 6.1"
        );
        assert!(bpftool_dump_has(Path::new(VMLINUX), bpftool_line));
    }
    for q in common {
        assert_eq!(old["answers"][q], true, "{q} on 6.1");
    }
}

fn assert_fails(args: &[&str], code: i32, needles: &[&str]) {
    let out = agent(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err:?}");
    }
}

#[test]
fn bad_btf_files_fail_with_the_file_named() {
    let missing = scratch("does-not-exist.btf");
    let _ = fs::remove_file(&missing);
    let m = missing.to_str().unwrap();
    assert_fails(&["profile", "--btf-path", m], 1, &[m, "No such file"]);

    let empty = scratch("empty.btf");
    fs::write(&empty, b"").unwrap();
    let e = empty.to_str().unwrap();
    assert_fails(&["profile", "--btf-path", e], 1, &[e, "empty"]);

    let garbage = scratch("garbage.btf");
    fs::write(
        &garbage,
        b"this is not BTF at all, just some text\n".repeat(10),
    )
    .unwrap();
    let g = garbage.to_str().unwrap();
    assert_fails(
        &["profile", "--btf-path", g],
        1,
        &[g, "not valid BTF", "magic"],
    );

    let raw = fs::read(VMLINUX).unwrap();
    let truncated = scratch("truncated.btf");
    for cut in [10, 24, 4096, raw.len() / 2, raw.len() - 1] {
        fs::write(&truncated, &raw[..cut]).unwrap();
        let t = truncated.to_str().unwrap();
        assert_fails(&["profile", "--btf-path", t], 1, &[t, "not valid BTF"]);
    }
    fs::write(&truncated, &raw[..raw.len() / 2]).unwrap();
    assert_fails(
        &["profile", "--btf-path", truncated.to_str().unwrap()],
        1,
        &["truncated"],
    );

    // Header intact, types scrambled.
    let corrupt = scratch("corrupt.btf");
    let mut bytes = raw.clone();
    for b in bytes[24..200_000].iter_mut().step_by(7) {
        *b = 0xff;
    }
    fs::write(&corrupt, &bytes).unwrap();
    let c = corrupt.to_str().unwrap();
    assert_fails(&["profile", "--btf-path", c], 1, &[c, "not valid BTF"]);

    assert_fails(
        &["profile", "--btf-path", "/"],
        1,
        &["cannot read", "directory"],
    );
    assert_fails(
        &["profile", "--btf-path", "/bin/true"],
        1,
        &["/bin/true", "ELF", ".BTF"],
    );
}

#[test]
fn files_over_the_size_limit_are_refused_before_reading() {
    let big = scratch("huge.btf");
    let f = fs::File::create(&big).unwrap();
    f.set_len(1 << 30).unwrap(); // sparse: 1 GiB, nothing written
    let b = big.to_str().unwrap();
    assert_fails(
        &["profile", "--btf-path", b],
        1,
        &[b, "larger than the limit"],
    );
    assert_fails(
        &["profile", "--btf-path", VMLINUX, "--max-btf-size", "1000"],
        1,
        &[VMLINUX, "larger than the limit of 1000 bytes"],
    );
    fs::remove_file(&big).unwrap();
}

#[test]
fn malformed_queries_and_releases_are_usage_errors() {
    assert_fails(
        &["profile", "--query", "field:task_struct.pid"],
        2,
        &["field:task_struct.pid", "struct NAME.FIELD"],
    );
    assert_fails(&["profile", "--query", "nope"], 2, &["KIND:FACT"]);
    assert_fails(
        &["profile", "--query", "helper:xdp:bpf_made_up"],
        2,
        &["not a known helper"],
    );
    assert_fails(
        &["profile", "--kernel-release", "linux"],
        2,
        &["invalid kernel release", "MAJOR.MINOR"],
    );
}

// ---------------------------------------------------------------------------
// Privileged: feature probes on the running kernel
// ---------------------------------------------------------------------------

/// False (after saying so) when privileged tests are off; panics when they are
/// on but this process is not root.
fn privileged() -> bool {
    if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipped: BPFPOLY_SKIP_PRIVILEGED=1 (the feature probes load eBPF)");
        return false;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(
        euid, "0",
        "the feature probes load eBPF programs and create maps: run as root, \
         or set BPFPOLY_SKIP_PRIVILEGED=1 to skip"
    );
    true
}

#[test]
fn probes_report_program_map_types_and_helpers() {
    if !privileged() {
        return;
    }
    let queries = [
        "helper:xdp:bpf_redirect",
        "helper:xdp:bpf_map_lookup_elem",
        "helper:socket_filter:bpf_xdp_adjust_head",
        "helper:kprobe:bpf_xdp_adjust_head",
        "helper:raw_tracepoint:bpf_ringbuf_output",
        "helper:tracing:bpf_ringbuf_output",
        "helper:ext:bpf_map_lookup_elem",
    ];
    let p = profile(&with_queries(VMLINUX, &queries));
    let list = |k: &str| -> Vec<String> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let programs = list("programTypes");
    for t in [
        "xdp",
        "sched_cls",
        "tracepoint",
        "raw_tracepoint",
        "socket_filter",
    ] {
        assert!(programs.contains(&t.to_string()), "{t} not in {programs:?}");
    }
    let maps = list("mapTypes");
    for t in [
        "hash",
        "array",
        "prog_array",
        "percpu_array",
        "ringbuf",
        "lpm_trie",
    ] {
        assert!(maps.contains(&t.to_string()), "{t} not in {maps:?}");
    }
    let a = &p["answers"];
    assert_eq!(a["helper:xdp:bpf_redirect"], true);
    assert_eq!(a["helper:xdp:bpf_map_lookup_elem"], true);
    assert_eq!(a["helper:socket_filter:bpf_xdp_adjust_head"], false);
    assert_eq!(a["helper:kprobe:bpf_xdp_adjust_head"], false);
    assert_eq!(a["helper:raw_tracepoint:bpf_ringbuf_output"], true);
    assert_eq!(a["helper:tracing:bpf_ringbuf_output"], true);
    // freplace helpers depend on the target program: no answer, and a note says so.
    assert_eq!(a["helper:ext:bpf_map_lookup_elem"], false);
    let notes = p["notes"].to_string();
    assert!(notes.contains("helper:ext:bpf_map_lookup_elem"), "{notes}");
    assert!(
        notes.contains("helper:tracing:bpf_ringbuf_output"),
        "{notes}"
    );
    // A probe that fails says why instead of dropping the type silently.
    for t in ["tracing", "ext", "lsm"] {
        assert!(
            programs.contains(&t.to_string()) || notes.contains(&format!("program type {t}")),
            "{t}: neither supported nor explained"
        );
    }
    let probes_ms = p["timings"]["probesMs"].as_f64().unwrap();
    assert!(probes_ms > 0.0 && probes_ms < 10_000.0, "{probes_ms}");
}
