//! Legacy tc filters leave with the version directory that records them. Kernels before
//! 6.6 have no TCX, and there the loader attaches a cls_bpf filter through netlink
//! (`attach_tc_netlink`); unpinning does not detach such a filter, so removal reads it
//! from the version's `meta` record and detaches it. This host has TCX: the test calls
//! the netlink path itself, on a veth pair of its own, with the built-in tc classifier
//! loaded into this kernel. Nothing is simulated.

#[path = "../../../test-support/ebpf_support.rs"]
#[allow(unused_macros)]
mod ebpf_support;

use std::{
    collections::BTreeMap,
    fs,
    process::{Command, Stdio},
};

use aya::{
    programs::{SchedClassifier, TcAttachType},
    EbpfLoader,
};
use bpfpoly_crds::state::ProgramStatus;

use super::{attach, pins, Record, RunningInfo};
use ebpf_support::{object, unique, RemoveDir};

/// A veth pair of the test's own, deleted on drop.
struct Veth(String);

impl Veth {
    fn new() -> Self {
        let name = format!("bpnl{}", std::process::id() % 100_000);
        // One left by an earlier run of this process id; usually there is none.
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        let peer = format!("{name}p");
        let ok = Command::new("ip")
            .args(["link", "add", &name, "type", "veth", "peer", "name", &peer])
            .status()
            .expect("running ip")
            .success();
        assert!(ok, "ip link add {name} type veth");
        Self(name)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The bpf filters on `dev`'s ingress hook, as `tc filter show` lists them (a filter's
/// line with its handle; tc prints a header line per priority as well).
fn ingress_filters(dev: &str) -> Vec<String> {
    let out = Command::new("tc")
        .args(["filter", "show", "dev", dev, "ingress"])
        .output()
        .expect("running tc (iproute2)");
    assert!(out.status.success(), "tc filter show dev {dev} ingress");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn removing_a_version_directory_detaches_its_legacy_tc_filter() {
    if !ebpf_support::privileged() {
        return;
    }
    let veth = Veth::new();
    let mut ebpf = EbpfLoader::new()
        .load(object("packet-classifier-tc"))
        .expect("loading the built-in tc classifier");
    let tc: &mut SchedClassifier = ebpf
        .program_mut("classify")
        .expect("classify")
        .try_into()
        .expect("a tc program");
    tc.load().expect("the verifier accepts classify");
    let tcx = std::io::Error::other("forced: the netlink path under test");
    let record = attach::attach_tc_netlink(
        tc,
        "classify",
        &veth.0,
        TcAttachType::Ingress,
        "ingress",
        &tcx,
    )
    .unwrap_or_else(|f| panic!("attaching through netlink: {}", f.reason));
    drop(ebpf);
    assert_eq!(
        ingress_filters(&veth.0).len(),
        1,
        "the filter outlives the loader's fds"
    );

    let root = RemoveDir(format!("/sys/fs/bpf/{}", unique("bpfpoly-nl")).into());
    let dir = root.0.join("program").join("digest");
    fs::create_dir_all(&dir).unwrap();
    let written = Record {
        version: pins::META_VERSION,
        program: "program".into(),
        created_unix_ms: 0,
        status: ProgramStatus::default(),
        info: RunningInfo {
            digest: "digest".into(),
            generation: 1,
            variant: "tc-legacy".into(),
            mechanism: None,
            programs: BTreeMap::new(),
            links: vec![record],
            dispatch_keys: vec![],
            pin_dir: dir.clone(),
        },
    };
    pins::write_meta(&dir, &serde_json::to_vec(&written).unwrap()).unwrap();

    pins::remove_dir(&root.0.join("program")).unwrap();
    assert!(!root.0.join("program").exists());
    assert_eq!(ingress_filters(&veth.0), Vec::<String>::new());
}
