#![allow(clippy::unwrap_used)]
//! `__kconfig` externs in the kernel: an outsider's libbpf-style object
//! (tests/fixtures/kconfig/kconfig_externs.c, built here with clang) runs through the
//! agent's loader as a BpfPolyProgram with a `path` source and a raw tracepoint; the
//! values it publishes in its map are the running kernel's, read here independently
//! (`uname -r`, `zcat /proc/config.gz`, `/proc/kallsyms`), and the variant's config
//! global beside them holds what the config wrote. A strong extern the kernel
//! config lacks fails the variant with the extern's name.

mod loader_support;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::maps::{Array, Map, MapData};
use bpfpoly_agent::loader::{Loader, LoaderConfig};
use bpfpoly_crds::state::Phase;
use loader_support::{assignment, fetch_with, unique_name};
use serde_json::json;

#[path = "../../test-support/outsider_clang.rs"]
mod outsider_clang;
use outsider_clang::build;

const SOURCE: &str = "tests/fixtures/kconfig/kconfig_externs.c";

fn scratch() -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kconfig-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The running kernel's config, read with zcat/cat rather than the agent's parser.
fn kernel_config() -> BTreeMap<String, String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let boot = format!("/boot/config-{}", release.trim());
    let text = if Path::new(&boot).exists() {
        fs::read_to_string(&boot).unwrap()
    } else {
        let out = Command::new("zcat")
            .arg("/proc/config.gz")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "neither {boot} nor /proc/config.gz is readable: this test needs the kernel config"
        );
        String::from_utf8(out.stdout).unwrap()
    };
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn loader(root: &Path, dir: &Path) -> Loader {
    Loader::new(LoaderConfig {
        bpffs_root: root.to_path_buf(),
        allowed_dirs: vec![dir.to_path_buf()],
        ..LoaderConfig::default()
    })
    .unwrap()
}

fn raw_tp_assignment(
    name: &str,
    object: &Path,
    config: serde_json::Value,
) -> bpfpoly_crds::state::ProgramAssignment {
    let bytes = fs::read(object).unwrap();
    assignment(
        name,
        1,
        vec![json!({
            "name": "kconfig",
            "bytecode": {
                "path": object.display().to_string(),
                "sha256": bpfpoly_agent::fetch::sha256_hex(&bytes),
            },
            "programs": [{"name": "read_kconfig", "attach": {"rawTracepoint": {"name": "sys_enter"}}}],
        })],
        config,
        None,
    )
}

struct RootDir(PathBuf);
impl Drop for RootDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The eleven values the program wrote into its map `seen` (pinned at `pin`). Any system
/// call runs the program; this makes a few until it has.
fn values_seen(pin: &Path) -> Vec<u64> {
    let mut values = vec![0u64; 11];
    for _ in 0..50 {
        let _ = fs::metadata("/");
        let map = MapData::from_pin(pin).unwrap();
        let array: Array<_, u64> = Array::try_from(Map::Array(map)).unwrap();
        values = (0..11).map(|k| array.get(&k, 0).unwrap()).collect();
        if values[0] != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    values
}

#[test]
fn kconfig_values_the_program_sees_are_the_kernels() {
    require_privileges!();
    let dir = scratch();
    let object = dir.join("kconfig_externs.o");
    build(Path::new(SOURCE), &object);
    let root = RootDir(PathBuf::from(format!(
        "/sys/fs/bpf/bpfpoly-verify-kc-{}",
        std::process::id()
    )));
    let mut loader = loader(&root.0, &dir);
    let name = unique_name("kconfig");
    let config = json!([{"name": "bias", "type": "u64", "value": "7"}]);
    let applied = loader.apply(
        &raw_tp_assignment(&name, &object, config),
        &fetch_with(vec![dir.clone()], 16 << 20),
    );
    assert_eq!(
        applied.status.phase,
        Phase::Loaded,
        "{}",
        applied.status.message
    );
    let (_, running) = loader.running().find(|(n, _)| *n == name).unwrap();
    let values = values_seen(&running.map_pin("seen"));

    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let nums: Vec<u64> = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse().unwrap())
        .collect();
    let version = (nums[0] << 16) | (nums[1] << 8) | nums[2].min(255);
    let config = kernel_config();
    let tri = |v: Option<&String>| match v.map(String::as_str) {
        Some("y") => 1,
        Some("m") => 2,
        _ => 0,
    };
    let kallsyms = fs::read_to_string("/proc/kallsyms").unwrap();
    let wrapper = kallsyms
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("__x64_sys_bpf"));
    let hostname = config["CONFIG_DEFAULT_HOSTNAME"]
        .trim_matches('"')
        .as_bytes();
    let mut host = [0u8; 8];
    let n = hostname.len().min(8);
    host[..n].copy_from_slice(&hostname[..n]);

    assert_eq!(values[0], version, "LINUX_KERNEL_VERSION of {release}");
    // bpf_get_attach_cookie arrived in 5.15.
    assert_eq!(
        values[1],
        u64::from(version >= (5 << 16 | 15 << 8)),
        "LINUX_HAS_BPF_COOKIE"
    );
    assert_eq!(values[2], u64::from(wrapper), "LINUX_HAS_SYSCALL_WRAPPER");
    assert_eq!(values[3], tri(config.get("CONFIG_BPF")), "CONFIG_BPF");
    assert_eq!(
        values[4],
        tri(config.get("CONFIG_BPF_SYSCALL")),
        "CONFIG_BPF_SYSCALL"
    );
    assert_eq!(
        values[5],
        config["CONFIG_HZ"].parse::<u64>().unwrap(),
        "CONFIG_HZ"
    );
    assert_eq!(
        values[6],
        config["CONFIG_NR_CPUS"].parse::<u64>().unwrap(),
        "CONFIG_NR_CPUS"
    );
    assert_eq!(
        values[7],
        u64::from_le_bytes(host),
        "CONFIG_DEFAULT_HOSTNAME"
    );
    assert_eq!(values[8], 0, "a weak missing bool is 0");
    assert_eq!(values[9], 0, "a weak missing int is 0");
    assert_eq!(
        values[10], 7,
        "the config global, written beside the externs"
    );

    loader.remove(&name).unwrap();
}

#[test]
fn a_strong_extern_missing_from_the_config_fails_with_its_name() {
    require_privileges!();
    let dir = scratch();
    let source = dir.join("strong_missing.c");
    fs::write(
        &source,
        r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern _Bool CONFIG_BPFPOLY_SURELY_MISSING __kconfig;
SEC("raw_tp/sys_enter")
int read_kconfig(void *ctx) { return CONFIG_BPFPOLY_SURELY_MISSING; }
char LICENSE[] SEC("license") = "GPL";
"#,
    )
    .unwrap();
    let object = dir.join("strong_missing.o");
    build(&source, &object);
    let root = RootDir(PathBuf::from(format!(
        "/sys/fs/bpf/bpfpoly-verify-ks-{}",
        std::process::id()
    )));
    let mut loader = loader(&root.0, &dir);
    let name = unique_name("kconfig-strong");
    let applied = loader.apply(
        &raw_tp_assignment(&name, &object, json!([])),
        &fetch_with(vec![dir.clone()], 16 << 20),
    );
    let s = &applied.status;
    assert_eq!(s.phase, Phase::Failed, "{}", s.message);
    assert!(
        s.message.contains("extern CONFIG_BPFPOLY_SURELY_MISSING")
            && s.message.contains("not set in"),
        "{}",
        s.message
    );
    assert!(!root.0.join(&name).exists(), "nothing left pinned");
}

#[test]
fn an_unresolvable_extern_fails_the_object_check_with_its_name() {
    require_privileges!();
    let dir = scratch();
    let source = dir.join("ksym.c");
    fs::write(
        &source,
        r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern const int bpfpoly_some_kernel_variable __ksym;
SEC("raw_tp/sys_enter")
int read_kconfig(void *ctx) { return *(&bpfpoly_some_kernel_variable) ? 1 : 0; }
char LICENSE[] SEC("license") = "GPL";
"#,
    )
    .unwrap();
    let object = dir.join("ksym.o");
    build(&source, &object);
    let root = RootDir(PathBuf::from(format!(
        "/sys/fs/bpf/bpfpoly-verify-kx-{}",
        std::process::id()
    )));
    let mut loader = loader(&root.0, &dir);
    let name = unique_name("kconfig-ksym");
    let applied = loader.apply(
        &raw_tp_assignment(&name, &object, json!([])),
        &fetch_with(vec![dir.clone()], 16 << 20),
    );
    let s = &applied.status;
    assert_eq!(s.phase, Phase::Failed, "{}", s.message);
    assert!(
        s.message.contains("unresolvable extern")
            && s.message.contains("bpfpoly_some_kernel_variable")
            && !s.message.contains("BTF error"),
        "{}",
        s.message
    );
    assert!(!root.0.join(&name).exists(), "nothing left pinned");
}
