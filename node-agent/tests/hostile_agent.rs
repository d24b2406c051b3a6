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

mod loader_support;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpfpoly_agent::fetch::sha256_hex;
use loader_support::{prog_exists, xdp_prog_ids};
use serde_json::{json, Value};

const NODE: &str = "rel-hostile";
const ROOT: &str = "/sys/fs/bpf/bpfpoly-rel-hostile";
const METRICS: &str = "127.0.0.1:19474";
const KEEP: &str = "rel-hostile-keep";
const FRESH: &str = "rel-hostile-fresh";
const NS_ALLOWED: &str = "rel-bytecode";
/// `--max-object-size` of this agent (the default is 16 MiB).
const MAX_OBJECT: u64 = 8 << 20;
/// The interfaces of this test, and where the samples' interfaces go on this node.
const VETHS: &[(&str, &str)] = &[
    ("brelh0", "brelh1"),
    ("brelh2", "brelh3"),
    ("brelhs0", "brelhs1"),
    ("brelhs2", "brelhs3"),
];
const ALIASES: &[&str] = &[
    "bpfpoly0=brelhs0",
    "bpfpoly1=brelhs1",
    "bpfpoly2=brelhs2",
    "bpfpoly3=brelhs3",
];

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn get_json(args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    kubectl(&a, None)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node_status(program: &str) -> Option<Value> {
    let st = get_json(&["bns", NODE])?;
    st["status"]["programs"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == program)
        .cloned()
}

fn ids(status: &Value) -> Vec<u64> {
    status["programIds"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn generation(program: &str) -> i64 {
    get_json(&["bpp", program]).unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap()
}

fn ip(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// The agent process of this test, with everything it owns removed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start(dir: &Path, allowed: &Path) -> Agent {
        let log = fs::File::create(dir.join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpfpoly-agent"));
        cmd.args(["run", "--node-name", NODE, "--bpffs-root", ROOT])
            .args(["--metrics-addr", METRICS])
            .arg("--allowed-bytecode-dirs")
            .arg(allowed)
            .args(["--configmap-namespaces", NS_ALLOWED])
            .args(["--max-object-size", &MAX_OBJECT.to_string()]);
        for a in ALIASES {
            cmd.args(["--interface-alias", a]);
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Agent {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Deletes this test's programs (and waits for their finalizers).
fn delete_programs() {
    for p in [KEEP, FRESH] {
        let _ = kubectl(
            &[
                "delete",
                "bpp",
                p,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=30s",
            ],
            None,
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        delete_programs();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(env!("CARGO_BIN_EXE_bpfpoly-agent"))
            .args(["cleanup", "--bpffs-root", ROOT])
            .output();
        let _ = fs::remove_dir(ROOT);
        let _ = kubectl(&["delete", "node", NODE, "--ignore-not-found"], None);
        for (a, _) in VETHS {
            ip(&["link", "del", a]);
        }
    }
}

/// A program on one veth, from `bytecode`.
fn program(name: &str, iface: &str, bytecode: Value) -> String {
    json!({
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfPolyProgram",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"bpfpoly.io/rel": "hostile"}},
            "variants": [{
                "name": "xdp", "bytecode": bytecode, "dispatchMechanism": "tailCall",
                "programs": [
                    {"name": "classify", "attach": {"xdp": {"interfaces": [iface], "mode": "skb"}}},
                    {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
                ]
            }],
            "dispatch": {"entry": "classify", "table": "jump_table", "slots": [
                {"key": 6, "handler": "handle_tcp"}, {"key": 17, "handler": "handle_udp"},
                {"key": 1, "handler": "handle_icmp"}]},
            "config": [{"name": "count_bytes", "type": "bool", "value": "true"},
                       {"name": "vlan_aware", "type": "bool", "value": "true"}],
            "fallback": {"keepPreviousOnFailure": true},
            "rollout": {"pauseOnDegradedRatio": 1.0}
        }
    })
    .to_string()
}

/// A little-endian ELF64 eBPF relocatable object with `n` empty sections (extended
/// section numbering once `n` does not fit `e_shnum`).
fn elf_with_sections(n: usize) -> Vec<u8> {
    let strtab = b"\0.shstrtab\0.x\0";
    let shoff = 64u64;
    let data_off = shoff + 64 * n as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    out.extend_from_slice(&247u16.to_le_bytes()); // EM_BPF
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 16]); // entry, phoff
    out.extend_from_slice(&shoff.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 0, 0, 64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let shnum = if n < 0xff00 { n as u16 } else { 0 };
    out.extend_from_slice(&shnum.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    let section = |out: &mut Vec<u8>, name: u32, ty: u32, off: u64, size: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&[0u8; 16]); // flags, addr
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]); // link, info
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
    };
    section(&mut out, 0, 0, 0, if n < 0xff00 { 0 } else { n as u64 });
    section(&mut out, 1, 3, data_off, strtab.len() as u64);
    for _ in 2..n {
        section(&mut out, 11, 1, data_off, 0);
    }
    out.extend_from_slice(strtab);
    out
}

/// `object` with the BTF type named by `pick` (id, kind) pointing at itself: a type loop.
fn with_btf_loop(object: &[u8], pick: impl Fn(u32, u32, &str) -> bool) -> Vec<u8> {
    use object::{Object as _, ObjectSection as _};
    let elf = object::File::parse(object).unwrap();
    let (start, _) = elf.section_by_name(".BTF").unwrap().file_range().unwrap();
    let start = start as usize;
    let mut out = object.to_vec();
    let word = |at: usize| u32::from_le_bytes(object[at..at + 4].try_into().unwrap()) as usize;
    let (hdr, type_off, type_len, str_off) = (
        word(start + 4),
        word(start + 8),
        word(start + 12),
        word(start + 16),
    );
    let strings = start + hdr + str_off;
    let name = |off: usize| {
        let s = &object[strings + off..];
        String::from_utf8_lossy(&s[..s.iter().position(|&c| c == 0).unwrap()]).into_owned()
    };
    let (mut at, end, mut id) = (
        start + hdr + type_off,
        start + hdr + type_off + type_len,
        1u32,
    );
    while at < end {
        let info = word(at + 4);
        let (kind, vlen) = (((info >> 24) & 0x1f) as u32, info & 0xffff);
        if pick(id, kind, &name(word(at))) {
            out[at + 8..at + 12].copy_from_slice(&id.to_le_bytes());
            return out;
        }
        at += 12
            + match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
        id += 1;
    }
    panic!("no BTF type to loop")
}

struct Case {
    what: &'static str,
    bytecode: Value,
    /// What the status message must say.
    expect: &'static [&'static str],
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
    let _ = fs::remove_dir_all(&dir);
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

    // Nodes, veths, namespaces and ConfigMaps of this test.
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

    let mut agent = Agent::start(&dir, &allowed);
    let pid = agent.child.id();
    wait_for("the agent's profile", 60, || {
        get_json(&["bnp", NODE]).filter(|p| p["status"]["kernel"]["release"].is_string())
    });

    // The good version.
    let path = |p: &str, sha: &str| json!({"path": p, "sha256": sha});
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(KEEP, "brelh0", path(&good_path, &good_sha))),
    )
    .unwrap();
    let first = wait_for("the good version Loaded", 60, || {
        node_status(KEEP).filter(|s| s["phase"] == "Loaded" && s["observedGeneration"] == 1)
    });
    let running_ids = ids(&first);
    let attached = xdp_prog_ids("brelh0");
    assert_eq!(attached.len(), 1, "{first}");
    assert!(running_ids.contains(&attached[0]));

    let cm = |ns: &str, name: &str, key: &str, sha: &str| json!({"configMap": {"namespace": ns, "name": name, "key": key}, "sha256": sha});
    let cases = vec![
        Case {
            what: "a 64 MiB object",
            bytecode: path(&big.display().to_string(), &big_sha),
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
        Case {
            what: "a wrong sha256",
            bytecode: path(&good_path, &sha(b"something else")),
            expect: &["sha256 mismatch"],
        },
        Case {
            what: "a missing ConfigMap",
            bytecode: cm(NS_ALLOWED, "rel-missing", "prog.o", &good_sha),
            expect: &["ConfigMap not found"],
        },
        Case {
            what: "a ConfigMap without the key",
            bytecode: cm(NS_ALLOWED, "rel-nokey", "prog.o", &good_sha),
            expect: &["no binaryData key"],
        },
        Case {
            what: "a ConfigMap with a wrong sha256",
            bytecode: cm(NS_ALLOWED, "rel-prog", "prog.o", &sha(b"x")),
            expect: &["sha256 mismatch"],
        },
        Case {
            what: "a ConfigMap in a namespace the agent does not read",
            bytecode: cm("rel-not-allowed", "rel-prog", "prog.o", &good_sha),
            expect: &["\"rel-not-allowed\" is not one this agent reads bytecode from"],
        },
        Case {
            what: "a path outside the allowed dirs",
            bytecode: path("/bin/true", &sha(&fs::read("/bin/true").unwrap())),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a host secret by path",
            bytecode: path("/etc/shadow", &good_sha),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a symlink escaping the allowed dirs",
            bytecode: path(&allowed.join("escape.o").display().to_string(), &good_sha),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a symlink to a host secret",
            bytecode: path(&allowed.join("shadow.o").display().to_string(), &good_sha),
            expect: &["resolves to /etc/shadow, outside the allowed directories"],
        },
        Case {
            what: "a directory symlink escaping the allowed dirs",
            bytecode: path(
                &allowed.join("dirlink/secret.o").display().to_string(),
                &good_sha,
            ),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "/proc/self/root",
            bytecode: path("/proc/self/root/etc/passwd", &good_sha),
            expect: &["outside the allowed directories"],
        },
        Case {
            what: "a FIFO",
            bytecode: path(&fifo.display().to_string(), &good_sha),
            expect: &["not a regular file"],
        },
    ];
    kubectl(
        &["apply", "-f", "-"],
        Some(&program(FRESH, "brelh2", cases[0].bytecode.clone())),
    )
    .unwrap();

    let mut failures = Vec::new();
    let mut timings = Vec::new();
    for case in &cases {
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
        timings.push(t0.elapsed());
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
        let pinned =
            || fs::read_dir(Path::new(ROOT).join(FRESH)).is_ok_and(|mut d| d.next().is_some());
        let deadline = Instant::now() + Duration::from_secs(5);
        while pinned() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pinned() {
            problems.push("the fresh program left pins".into());
        }
        for needle in case.expect {
            if !keep_msg.contains(needle) || !fresh_msg.contains(needle) {
                problems.push(format!("{needle:?} not in the status messages:\n  keep:  {keep_msg}\n  fresh: {fresh_msg}"));
            }
        }
        println!(
            "{:<55} {:>5} ms  {}",
            case.what,
            t0.elapsed().as_millis(),
            fresh_msg.chars().take(160).collect::<String>()
        );
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.what, problems.join("\n  ")));
        }
    }

    // Refused by validation before any node sees them: `..`, and missing digests.
    let invalid = [
        (
            "a `..` path",
            path(
                &format!("{}/../outside/secret.o", allowed.display()),
                &good_sha,
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
    // The Events say it too.
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
