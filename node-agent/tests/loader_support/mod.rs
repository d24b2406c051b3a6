//! Shared by the loader tests: privileges, unique bpffs roots and veth pairs,
//! assignments built from JSON, frames, and bpftool queries.

#![allow(clippy::unwrap_used, dead_code)]

use std::{
    fs,
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use bpfpoly_agent::loader::DEFAULT_SLOT;
use bpfpoly_agent::{
    builtin,
    fetch::{fetch_path, FetchError},
    loader::{Loader, LoaderConfig},
};
use bpfpoly_crds::{program::Bytecode, state::ProgramAssignment};
use serde_json::{json, Value};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// False (after saying so) when privileged tests are switched off; panics when they
/// are on but cannot run.
pub fn privileged() -> bool {
    if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipped: BPFPOLY_SKIP_PRIVILEGED=1 (this test loads eBPF into the kernel)");
        return false;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    assert!(
        has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)),
        "the loader tests load eBPF programs and create veth pairs: run as root \
         (CapEff={cap_eff:#x}), or set BPFPOLY_SKIP_PRIVILEGED=1 to skip them"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    );
    true
}

#[macro_export]
macro_rules! require_privileges {
    () => {
        if !$crate::loader_support::privileged() {
            return;
        }
    };
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A bpffs root of its own, removed (with everything pinned in it) on drop.
pub struct Root(pub PathBuf);

impl Root {
    pub fn new() -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/bpfpoly-test-{}-{}",
            std::process::id(),
            next()
        )))
    }

    pub fn config(&self) -> LoaderConfig {
        LoaderConfig {
            bpffs_root: self.0.clone(),
            ..LoaderConfig::default()
        }
    }

    pub fn loader(&self) -> Loader {
        Loader::new(self.config()).unwrap()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair `a` <-> `b`, up, deleted on drop. Programs attach to `a`; frames sent
/// out of `b` arrive on `a`.
pub struct Veth {
    pub a: String,
    pub b: String,
}

impl Veth {
    pub fn new() -> Self {
        let n = next();
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let (a, b) = (format!("bp{tag}a"), format!("bp{tag}b"));
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        // The link-local source must be usable at once (no duplicate address detection).
        for dev in [&a, &b] {
            let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad"), "0");
        }
        run("ip", &["link", "set", &a, "up"]);
        run("ip", &["link", "set", &b, "up"]);
        Self { a, b }
    }

    fn ifindex(dev: &str) -> u32 {
        fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends `n` UDP datagrams (IPv6 link-local multicast) out of `b`, so that they
    /// arrive on `a`. Retries while the interface's address is not ready.
    pub fn send_udp(&self, n: usize) {
        let socket = UdpSocket::bind("[::]:0").unwrap();
        let to = SocketAddrV6::new(
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            9,
            0,
            Self::ifindex(&self.b),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < n {
            match socket.send_to(b"bpfpoly", to) {
                Ok(_) => sent += 1,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "sending UDP out of {}: {e}",
                        self.b
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.a]).output();
    }
}

/// `bytecode.builtin`, `bytecode.path`; everything else is unavailable.
pub fn fetch_with(
    allowed: Vec<PathBuf>,
    max: u64,
) -> impl Fn(&Bytecode) -> Result<Vec<u8>, FetchError> {
    move |b: &Bytecode| {
        if let Some(name) = &b.builtin {
            return builtin::builtin(name).map(<[u8]>::to_vec).ok_or_else(|| {
                FetchError::Unavailable {
                    what: format!("builtin {name:?}"),
                    reason: "no such built-in object".into(),
                }
            });
        }
        if let Some(path) = &b.path {
            return fetch_path(path, b.sha256.as_deref(), &allowed, max);
        }
        Err(FetchError::Unavailable {
            what: "configMap".into(),
            reason: "not in these tests".into(),
        })
    }
}

pub fn fetch_builtin(b: &Bytecode) -> Result<Vec<u8>, FetchError> {
    fetch_with(Vec::new(), 16 << 20)(b)
}

/// A classifier variant on `iface` (XDP, skb mode) with the three handlers listed.
pub fn classifier_variant(name: &str, object: &str, iface: &str, mechanism: Option<&str>) -> Value {
    let mut v = json!({
        "name": name,
        "bytecode": {"builtin": object},
        "programs": [
            {"name": "classify", "attach": {"xdp": {"interfaces": [iface], "mode": "skb"}}},
            {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
        ]
    });
    if let Some(m) = mechanism {
        v["dispatchMechanism"] = json!(m);
    }
    v
}

pub fn classifier_dispatch(mechanism: &str) -> Value {
    json!({
        "entry": "classify",
        "mechanism": mechanism,
        "table": "jump_table",
        "slots": [
            {"key": 6, "handler": "handle_tcp"},
            {"key": 17, "handler": "handle_udp"},
            {"key": 1, "handler": "handle_icmp"}
        ]
    })
}

pub fn classifier_config(count_bytes: bool) -> Value {
    json!([
        {"name": "count_bytes", "type": "bool", "value": count_bytes.to_string()},
        {"name": "vlan_aware", "type": "bool", "value": "true"}
    ])
}

pub fn assignment(
    name: &str,
    generation: i64,
    candidates: Vec<Value>,
    config: Value,
    dispatch: Option<Value>,
) -> ProgramAssignment {
    let mut a = json!({
        "name": name,
        "generation": generation,
        "candidates": candidates,
        "config": config,
    });
    if let Some(d) = dispatch {
        a["dispatch"] = d;
    }
    serde_json::from_value(a).unwrap()
}

pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", next())
}

/// `bpftool prog show id <id>` succeeds.
pub fn prog_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// `bpftool link show id <id>` succeeds.
pub fn link_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// Waits (the kernel frees programs after an RCU grace period) until `gone` holds.
pub fn eventually(what: &str, mut gone: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// XDP program ids attached to `dev`, from `bpftool -j net show dev <dev>`.
pub fn xdp_prog_ids(dev: &str) -> Vec<u64> {
    let out = run("bpftool", &["-j", "net", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut ids = Vec::new();
    for entry in v.as_array().into_iter().flatten() {
        for x in entry["xdp"].as_array().into_iter().flatten() {
            if let Some(id) = x["id"].as_u64() {
                ids.push(id);
            }
        }
    }
    ids
}

/// TCX ingress program ids attached to `dev` (this bpftool predates TCX).
pub fn tc_prog_ids(dev: &str) -> Vec<u64> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let (_, programs) = SchedClassifier::query_tcx(dev, TcAttachType::Ingress).unwrap();
    programs.iter().map(|p| u64::from(p.id())).collect()
}

/// Frames for BPF_PROG_TEST_RUN.
pub mod frames {
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;

    pub fn ipv4(proto: u8) -> Vec<u8> {
        let l4: Vec<u8> = match proto {
            IPPROTO_TCP => {
                let mut t = vec![
                    0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
                ];
                t.extend_from_slice(&[0, 0, 0, 0]);
                t
            }
            _ => vec![0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00],
        };
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = 20 + l4.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend(l4);
        f
    }
}

/// The XDP verdict.
pub const XDP_PASS: u32 = 2;

/// Runs `frame` through the pinned entry program with BPF_PROG_TEST_RUN.
pub fn test_run(pin: &Path, frame: &[u8]) -> u32 {
    let xdp = Xdp::from_pin(pin, XdpAttachType::Interface).unwrap();
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::default()
    };
    Xdp::test_run(&xdp, opts).unwrap().return_value
}

pub fn count(loader: &Loader, name: &str, key: u32) -> u64 {
    let counts = loader.dispatch_counts(name).unwrap();
    if key == DEFAULT_SLOT {
        counts.default
    } else {
        counts.per_key.get(&key).copied().unwrap_or(0)
    }
}

pub fn wait_count(loader: &Loader, name: &str, key: u32, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count(loader, name, key);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
