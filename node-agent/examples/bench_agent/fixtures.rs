//! Fixtures: a veth pair, a bpffs directory, the assignments the loader is given, and
//! bpftool and ip as processes.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bpfpoly_agent::{builtin, fetch::FetchError};
use bpfpoly_crds::{program::Bytecode, state::ProgramAssignment};
use serde_json::{json, Value};

pub fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub struct Veth {
    pub a: String,
}

impl Veth {
    pub fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let (a, b) = (format!("bpbench{tag}a"), format!("bpbench{tag}b"));
        let _ = sh("ip", &["link", "del", &a]);
        must(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        must("ip", &["link", "set", &a, "up"]);
        must("ip", &["link", "set", &b, "up"]);
        Self { a }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.a]);
    }
}

/// A bpffs directory of our own, removed (with what is pinned in it) on drop.
pub struct Dir(pub PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn fetch(b: &Bytecode) -> Result<Vec<u8>, FetchError> {
    let name = b.builtin.as_deref().unwrap_or_default();
    builtin::builtin(name)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| FetchError::Unavailable {
            what: format!("builtin {name:?}"),
            reason: "not a built-in object".into(),
        })
}

pub fn variant(name: &str, object: &str, iface: &str) -> Value {
    json!({
        "name": name,
        "bytecode": {"builtin": object},
        "dispatchMechanism": "tailCall",
        "programs": [
            {"name": "classify", "attach": {"xdp": {"interfaces": [iface], "mode": "skb"}}},
            {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
        ]
    })
}

pub fn assignment(
    name: &str,
    generation: i64,
    candidates: Vec<Value>,
    count_bytes: bool,
) -> ProgramAssignment {
    serde_json::from_value(json!({
        "name": name,
        "generation": generation,
        "candidates": candidates,
        "config": [
            {"name": "count_bytes", "type": "bool", "value": count_bytes.to_string()},
            {"name": "vlan_aware", "type": "bool", "value": "false"}
        ],
        "dispatch": {
            "entry": "classify", "mechanism": "auto", "table": "jump_table",
            "slots": [
                {"key": 6, "handler": "handle_tcp"},
                {"key": 17, "handler": "handle_udp"},
                {"key": 1, "handler": "handle_icmp"}
            ]
        },
        "fallback": {"onVerifierReject": "NextVariant", "onHandlerReject": "DefaultPath"}
    }))
    .unwrap()
}

/// XDP program id attached to `dev` (bpftool), if any.
pub fn xdp_prog_id(dev: &str) -> Option<u64> {
    let o = sh("bpftool", &["-j", "net", "show", "dev", dev]);
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?
        .iter()
        .flat_map(|e| e["xdp"].as_array().cloned().unwrap_or_default())
        .find_map(|x| x["id"].as_u64())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn time_cmd(cmd: &str, args: &[&str]) -> (f64, bool) {
    let t = Instant::now();
    let status = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (ms(t.elapsed()), status.success())
}
