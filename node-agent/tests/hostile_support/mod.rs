//! What the hostile-bytecode test (hostile_agent.rs) drives the system with: its node, agent
//! process, programs and kubectl, and builders of hostile objects (ELF with many sections,
//! BTF with type loops).

#![allow(clippy::unwrap_used, dead_code)]

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const NODE: &str = "rel-hostile";
pub const ROOT: &str = "/sys/fs/bpf/bpfpoly-rel-hostile";
pub const METRICS: &str = "127.0.0.1:19474";
pub const KEEP: &str = "rel-hostile-keep";
pub const FRESH: &str = "rel-hostile-fresh";
pub const NS_ALLOWED: &str = "rel-bytecode";
/// `--max-object-size` of this agent (the default is 16 MiB).
pub const MAX_OBJECT: u64 = 8 << 20;
/// The interfaces of this test, and where the samples' interfaces go on this node.
pub const VETHS: &[(&str, &str)] = &[
    ("brelh0", "brelh1"),
    ("brelh2", "brelh3"),
    ("brelhs0", "brelhs1"),
    ("brelhs2", "brelhs3"),
];
pub const ALIASES: &[&str] = &[
    "bpfpoly0=brelhs0",
    "bpfpoly1=brelhs1",
    "bpfpoly2=brelhs2",
    "bpfpoly3=brelhs3",
];

pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
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

pub fn get_json(args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    kubectl(&a, None)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
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

pub fn node_status(program: &str) -> Option<Value> {
    let st = get_json(&["bns", NODE])?;
    st["status"]["programs"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == program)
        .cloned()
}

pub fn ids(status: &Value) -> Vec<u64> {
    status["programIds"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

pub fn generation(program: &str) -> i64 {
    get_json(&["bpp", program]).unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap()
}

pub fn ip(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// The agent process of this test, with everything it owns removed on drop.
pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, allowed: &Path) -> Agent {
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

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Deletes this test's programs (and waits for their finalizers).
pub fn delete_programs() {
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
pub fn program(name: &str, iface: &str, bytecode: Value) -> String {
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
pub fn elf_with_sections(n: usize) -> Vec<u8> {
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
pub fn with_btf_loop(object: &[u8], pick: impl Fn(u32, u32, &str) -> bool) -> Vec<u8> {
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
