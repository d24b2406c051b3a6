//! Hostile bytecode through the whole system: a real agent process of its own (node
//! `rel-hostile`, bpffs root `/sys/fs/bpf/bpfpoly-rel-hostile`, metrics :19474), the
//! operator and the API server of `make run`, the real kernel.
//!
//! Two programs select the node: `rel-hostile-keep` runs a good version first and is then
//! updated to each hostile source (make-before-break: the good version must keep running,
//! same kernel program ids, one XDP program on the interface), and `rel-hostile-fresh`
//! gets each hostile source with nothing running before (phase Failed, nothing attached,
//! nothing pinned). Every case must give a status message naming the cause, and the agent
//! process must stay alive. Sources: a 64 MiB object (over `--max-object-size`, set to
//! 8 MiB here to show the flag works), zero bytes, a truncated ELF, an ELF with 10,000
//! sections, an x86-64 binary, BTF with type loops, a wrong sha256, a missing ConfigMap,
//! a ConfigMap in a namespace the agent does not read, a path outside the allowed
//! directories, symlinks escaping them, a FIFO (must not block the agent), and `..`
//! paths and missing digests (refused by the operator's validation before any node).
//!
//! Needs root and the API server: `#[ignore]`d, run by e2e/chaos/chaos.sh (or
//! `KUBECONFIG=.run/cluster/kubeconfig cargo test -p bpfpoly-agent --test hostile_agent
//! -- --ignored` with `make run` up).

#![allow(clippy::unwrap_used)]

mod hostile_support;
mod loader_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bpfpoly_agent::fetch::sha256_hex;
use hostile_support::*;
use loader_support::{prog_exists, xdp_prog_ids};
use serde_json::{json, Value};

struct Case {
    what: &'static str,
    bytecode: Value,
    /// What the status message must say.
    expect: &'static [&'static str],
}

/// The hostile files, in `allowed` (and one in `outside`), and the good object's.
struct Sources {
    dir: PathBuf,
    allowed: PathBuf,
    good_path: String,
    good_sha: String,
}

/// A `path` bytecode.
fn path(p: &str, sha: &str) -> Value {
    json!({"path": p, "sha256": sha})
}

/// A `configMap` bytecode.
fn cm(ns: &str, name: &str, key: &str, sha: &str) -> Value {
    json!({"configMap": {"namespace": ns, "name": name, "key": key}, "sha256": sha})
}

/// What runs before the hostile updates: the good version's kernel program ids, and the
/// XDP program attached to brelh0.
struct Running {
    ids: Vec<u64>,
    attached: Vec<u64>,
}

#[test]
#[ignore = "needs root and the API server of `make run`: run by e2e/chaos/chaos.sh"]
fn hostile_bytecode_gives_a_status_error_and_the_previous_version_keeps_running() {
    if !loader_support::privileged() {
        return;
    }
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG must name the API server of `make run`"
    );
    let dir = std::env::temp_dir().join("bpfpoly-rel-hostile");
    let (src, cases) = hostile_sources(&dir);
    set_up_cluster(&src.good_path);
    let mut agent = Agent::start(&src.dir, &src.allowed);
    let pid = agent.child.id();
    wait_for("the agent's profile", 60, || {
        get_json(&["bnp", NODE]).filter(|p| p["status"]["kernel"]["release"].is_string())
    });
    let running = run_the_good_version(&src);
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(FRESH, "brelh2", cases[0].bytecode.clone())),
    )
    .unwrap();
    let mut failures = Vec::new();
    let mut timings = Vec::new();
    for case in &cases {
        let (took, problems) = check_case(case, &mut agent, &running);
        timings.push(took);
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.what, problems.join("\n  ")));
        }
    }
    failures.extend(check_refused_by_validation(&src, &running));
    failures.extend(check_events_and_agent(&mut agent, pid));
    let slowest = timings.iter().max().copied().unwrap_or_default();
    println!(
        "{} hostile sources, agent pid {pid} alive throughout, slowest report {} ms",
        cases.len() + 3,
        slowest.as_millis()
    );
    drop(agent);
    let _ = fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Writes the good object and every hostile source under `dir`; returns them and the cases.
fn hostile_sources(dir: &Path) -> (Sources, Vec<Case>) {
    let _ = fs::remove_dir_all(dir);
    let (allowed, outside) = (dir.join("allowed"), dir.join("outside"));
    fs::create_dir_all(&allowed).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let good = bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap();
    let sha = |b: &[u8]| sha256_hex(b);
    let write = |name: &str, bytes: &[u8]| {
        fs::write(allowed.join(name), bytes).unwrap();
        (allowed.join(name).display().to_string(), sha256_hex(bytes))
    };
    let (good_path, good_sha) = write("good.o", good);
    let zero = write("zero.o", b"");
    let truncated = write("truncated.o", &good[..200]);
    let many = write("sections.o", &elf_with_sections(10_000));
    let x86 = write("x86.o", &fs::read("/bin/true").unwrap());
    // A typedef that resolves to itself, in the type of the config globals.
    let loop_global = write(
        "btf-loop-global.o",
        &with_btf_loop(good, |_, kind, name| kind == 8 && name == "bool"),
    );
    // A pointer to itself, used by no global (the entry's context argument type).
    let loop_ptr = write(
        "btf-loop-ptr.o",
        &with_btf_loop(good, |id, kind, _| kind == 2 && id > 30),
    );
    // 64 MiB, sparse: the size check comes before any read.
    let big = allowed.join("big.o");
    fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    let big_sha = sha(&vec![0u8; 64 << 20]);
    fs::write(outside.join("secret.o"), good).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.o"), allowed.join("escape.o")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", allowed.join("shadow.o")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("dirlink")).unwrap();
    let fifo = allowed.join("fifo.o");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut cases = object_cases(&FileCases {
        big: (big.display().to_string(), big_sha),
        zero,
        truncated,
        many,
        x86,
        loop_global,
        loop_ptr,
    });
    cases.extend(source_cases(&allowed, &good_path, &good_sha, &fifo));
    let src = Sources {
        dir: dir.to_path_buf(),
        allowed,
        good_path,
        good_sha,
    };
    (src, cases)
}

/// The hostile objects as (path, sha256).
struct FileCases {
    big: (String, String),
    zero: (String, String),
    truncated: (String, String),
    many: (String, String),
    x86: (String, String),
    loop_global: (String, String),
    loop_ptr: (String, String),
}

/// Hostile objects: too large, empty, truncated, too many sections, not eBPF, BTF loops.
fn object_cases(f: &FileCases) -> Vec<Case> {
    let FileCases {
        big,
        zero,
        truncated,
        many,
        x86,
        loop_global,
        loop_ptr,
    } = f;
    let big_sha = &big.1;
    let big = Path::new(&big.0);
    vec![
        Case {
            what: "a 64 MiB object",
            bytecode: path(&big.display().to_string(), big_sha),
            expect: &["67108864 bytes, over the limit of 8388608 bytes"],
        },
        Case {
            what: "a zero-byte object",
            bytecode: path(&zero.0, &zero.1),
            expect: &["empty"],
        },
        Case {
            what: "a truncated ELF",
            bytecode: path(&truncated.0, &truncated.1),
            expect: &["malformed ELF"],
        },
        Case {
            what: "an ELF with 10,000 sections",
            bytecode: path(&many.0, &many.1),
            expect: &["too many sections: 9999"],
        },
        Case {
            what: "an x86 binary",
            bytecode: path(&x86.0, &x86.1),
            expect: &["not an eBPF object", "X86_64"],
        },
        Case {
            what: "BTF with a type loop under the config globals",
            bytecode: path(&loop_global.0, &loop_global.1),
            expect: &["count_bytes"],
        },
        Case {
            what: "BTF with a pointer type loop",
            bytecode: path(&loop_ptr.0, &loop_ptr.1),
            expect: &["BTF"],
        },
    ]
}

/// Hostile sources of a good object: a wrong digest, ConfigMaps that are missing, lack the
/// key or sit in a namespace the agent does not read, paths outside the allowed directories
/// (directly, by symlink, through /proc), and a FIFO.
fn source_cases(allowed: &Path, good_path: &str, good_sha: &str, fifo: &Path) -> Vec<Case> {
    let good_sha_ref = good_sha;
    let sha = |b: &[u8]| sha256_hex(b);
    vec![
        Case {
            what: "a wrong sha256",
            bytecode: path(good_path, &sha(b"something else")),
            expect: &["sha256 mismatch"],
        },
        Case {
            what: "a missing ConfigMap",
            bytecode: cm(NS_ALLOWED, "rel-missing", "prog.o", good_sha_ref),
            expect: &["ConfigMap not found"],
        },
        Case {
            what: "a ConfigMap without the key",
            bytecode: cm(NS_ALLOWED, "rel-nokey", "prog.o", good_sha_ref),
            expect: &["no binaryData key"],
        },
        Case {
            what: "a ConfigMap with a wrong sha256",
            bytecode: cm(NS_ALLOWED, "rel-prog", "prog.o", &sha(b"x")),
            expect: &["sha256 mismatch"],
        },
        Case {
            what: "a ConfigMap in a namespace the agent does not read",
            bytecode: cm("rel-not-allowed", "rel-prog", "prog.o", good_sha_ref),
            expect: &["\"rel-not-allowed\" is not one this agent reads bytecode from"],
        },
        Case {
            what: "a path outside the allowed dirs",
            bytecode: path("/bin/true", &sha(&fs::read("/bin/true").unwrap())),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a host secret by path",
            bytecode: path("/etc/shadow", good_sha_ref),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a symlink escaping the allowed dirs",
            bytecode: path(
                &allowed.join("escape.o").display().to_string(),
                good_sha_ref,
            ),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a symlink to a host secret",
            bytecode: path(
                &allowed.join("shadow.o").display().to_string(),
                good_sha_ref,
            ),
            expect: &["resolves to /etc/shadow, outside the allowed directories"],
        },
        Case {
            what: "a directory symlink escaping the allowed dirs",
            bytecode: path(
                &allowed.join("dirlink/secret.o").display().to_string(),
                good_sha_ref,
            ),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "/proc/self/root",
            bytecode: path("/proc/self/root/etc/passwd", good_sha_ref),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a FIFO",
            bytecode: path(&fifo.display().to_string(), good_sha_ref),
            expect: &["not a regular file"],
        },
    ]
}

/// Nodes, veths, namespaces and ConfigMaps of this test; no program of it left over.
fn set_up_cluster(good_path: &str) {
    for (a, b) in VETHS {
        ip(&["link", "del", a]);
        ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ip(&["link", "set", a, "up"]);
        ip(&["link", "set", b, "up"]);
    }
    kubectl(
        &["apply", "-f", "-"],
        Some(
            &json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"bpfpoly.io/rel": "hostile"}}})
            .to_string(),
        ),
    )
    .unwrap();
    for ns in [NS_ALLOWED, "rel-not-allowed"] {
        let _ = kubectl(&["create", "namespace", ns], None);
        let _ = kubectl(
            &[
                "-n",
                ns,
                "delete",
                "configmap",
                "rel-prog",
                "rel-nokey",
                "--ignore-not-found",
            ],
            None,
        );
        kubectl(
            &[
                "-n",
                ns,
                "create",
                "configmap",
                "rel-prog",
                &format!("--from-file=prog.o={good_path}"),
            ],
            None,
        )
        .unwrap();
    }
    kubectl(
        &[
            "-n",
            NS_ALLOWED,
            "create",
            "configmap",
            "rel-nokey",
            &format!("--from-file=other.o={good_path}"),
        ],
        None,
    )
    .unwrap();
    delete_programs();
    let _ = Command::new(env!("CARGO_BIN_EXE_bpfpoly-agent"))
        .args(["cleanup", "--bpffs-root", ROOT])
        .output();
}

/// The good version of KEEP, Loaded on brelh0: what must keep running.
fn run_the_good_version(src: &Sources) -> Running {
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(
            KEEP,
            "brelh0",
            path(&src.good_path, &src.good_sha),
        )),
    )
    .unwrap();
    let first = wait_for("the good version Loaded", 60, || {
        node_status(KEEP).filter(|s| s["phase"] == "Loaded" && s["observedGeneration"] == 1)
    });
    let running_ids = ids(&first);
    let attached = xdp_prog_ids("brelh0");
    assert_eq!(attached.len(), 1, "{first}");
    assert!(running_ids.contains(&attached[0]));
    Running {
        ids: running_ids,
        attached,
    }
}

/// KEEP updated to the hostile source and FRESH given it: KEEP keeps running, FRESH is
/// Failed with nothing attached or pinned, both messages name the cause, the agent lives.
fn check_case(case: &Case, agent: &mut Agent, running: &Running) -> (Duration, Vec<String>) {
    let (running_ids, attached) = (&running.ids[..], &running.attached[..]);
    let t0 = Instant::now();
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(KEEP, "brelh0", case.bytecode.clone())),
    )
    .unwrap();
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(FRESH, "brelh2", case.bytecode.clone())),
    )
    .unwrap();
    let (gk, gf) = (generation(KEEP), generation(FRESH));
    let keep = wait_for(
        &format!("{}: the update to {gk} reported", case.what),
        60,
        || {
            node_status(KEEP).filter(|s| {
                s["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("update to generation {gk} failed")))
                    || s["observedGeneration"] == gk
            })
        },
    );
    let fresh = wait_for(
        &format!("{}: the fresh program reported", case.what),
        60,
        || node_status(FRESH).filter(|s| s["observedGeneration"] == gf),
    );
    let keep_msg = keep["message"].as_str().unwrap_or_default().to_string();
    let fresh_msg = fresh["message"].as_str().unwrap_or_default().to_string();
    let mut problems = Vec::new();
    if !agent.alive() {
        problems.push(format!("the agent exited:\n{}", agent.log_tail()));
    }
    if keep["phase"] != "Loaded" || ids(&keep) != running_ids {
        problems.push(format!("the previous version did not keep running: {keep}"));
    }
    if xdp_prog_ids("brelh0") != attached {
        problems.push(format!(
            "brelh0 now runs {:?}, not {attached:?}",
            xdp_prog_ids("brelh0")
        ));
    }
    if running_ids.iter().any(|&id| !prog_exists(id as u32)) {
        problems.push("a running program is gone from the kernel".into());
    }
    if fresh["phase"] != "Failed" || !xdp_prog_ids("brelh2").is_empty() {
        problems.push(format!(
            "the fresh program is not Failed with nothing attached: {fresh}"
        ));
    }
    // Every reconcile tries a failed program again (a ConfigMap may appear), so an
    // attempt may be under way right now: its pins must be gone once it has failed.
    let pinned = || fs::read_dir(Path::new(ROOT).join(FRESH)).is_ok_and(|mut d| d.next().is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinned() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pinned() {
        problems.push("the fresh program left pins".into());
    }
    for needle in case.expect {
        if !keep_msg.contains(needle) || !fresh_msg.contains(needle) {
            problems.push(format!(
                "{needle:?} not in the status messages:\n  keep:  {keep_msg}\n  fresh: {fresh_msg}"
            ));
        }
    }
    println!(
        "{:<55} {:>5} ms  {}",
        case.what,
        t0.elapsed().as_millis(),
        fresh_msg.chars().take(160).collect::<String>()
    );
    (t0.elapsed(), problems)
}

/// Refused by validation before any node sees them: `..`, and missing digests; the running
/// version stays.
fn check_refused_by_validation(src: &Sources, running: &Running) -> Vec<String> {
    let (allowed, good_path, good_sha) = (&src.allowed, &src.good_path, &src.good_sha);
    let (running_ids, attached) = (&running.ids[..], &running.attached[..]);
    let mut failures = Vec::new();
    let invalid = [
        (
            "a `..` path",
            path(
                &format!("{}/../outside/secret.o", allowed.display()),
                good_sha,
            ),
            "must not contain '..'",
        ),
        (
            "a path without sha256",
            json!({"path": good_path}),
            "is required for configMap and path bytecode",
        ),
        (
            "a ConfigMap without sha256",
            json!({"configMap": {"namespace": NS_ALLOWED, "name": "rel-prog", "key": "prog.o"}}),
            "is required for configMap and path bytecode",
        ),
    ];
    for (what, bytecode, needle) in invalid {
        match kubectl(
            &["apply", "-f", "-"],
            Some(&program(KEEP, "brelh0", bytecode)),
        ) {
            // The schema may refuse it at the API server already.
            Err(e) => println!("{what:<55} refused by the API server: {}", e.trim()),
            Ok(_) => {
                let g = generation(KEEP);
                let ready = wait_for(&format!("{what}: Invalid"), 30, || {
                    let p = get_json(&["bpp", KEEP])?;
                    p["status"]["conditions"]
                        .as_array()?
                        .iter()
                        .find(|c| c["type"] == "Ready" && c["observedGeneration"] == g)
                        .cloned()
                });
                let message = ready["message"].as_str().unwrap_or_default();
                if ready["reason"] != "Invalid" || !message.contains(needle) {
                    failures.push(format!("{what}: not refused as Invalid: {ready}"));
                }
                println!("{what:<55} Invalid: {message}");
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let s = node_status(KEEP).unwrap();
        if ids(&s) != running_ids || xdp_prog_ids("brelh0") != attached {
            failures.push(format!("{what}: the running version changed: {s}"));
        }
    }
    failures
}

/// The Events say it too, and the agent is the same process, serving metrics.
fn check_events_and_agent(agent: &mut Agent, pid: u32) -> Vec<String> {
    let mut failures = Vec::new();
    let events = get_json(&["events.events.k8s.io", "-n", "default"]).unwrap();
    let update_failed = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["reason"] == "UpdateFailed" && e["regarding"]["name"] == KEEP);
    if !update_failed {
        failures.push("no UpdateFailed Event for the kept program".into());
    }
    assert!(agent.alive(), "the agent exited:\n{}", agent.log_tail());
    assert_eq!(agent.child.id(), pid);
    let metrics = Command::new("curl")
        .args(["-sf", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&metrics.stdout).contains("bpfpoly_program_info{"),
        "the agent still serves metrics"
    );
    failures
}
