//! Shared by the eBPF test files of node-agent/tests (`ebpf_programs.rs`,
//! `classifier_dispatch.rs`, `exec_tracer.rs`), included with `#[path]` and `#[macro_use]`:
//! the privilege check (a missing privilege fails the test with the reason, only
//! `BPFPOLY_SKIP_PRIVILEGED=1` skips), the mounts, unique names, the built-in objects, errno
//! and verifier-log helpers. Each file uses a part of it.
#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
};

use aya::{programs::ProgramError, Btf, Ebpf};

use crate::builtin;

// ---------------------------------------------------------------------------
// Privileges and mounts
// ---------------------------------------------------------------------------

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Returns false (after saying so) when privileged tests are switched off;
/// panics with the reason when they are on but cannot run here.
pub fn privileged() -> bool {
    if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipped: BPFPOLY_SKIP_PRIVILEGED=1 (this test loads eBPF into the kernel)");
        return false;
    }
    let status = fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let bpf = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN));
    assert!(
        bpf,
        "these tests load eBPF programs: run as root (CAP_SYS_ADMIN, or CAP_BPF+CAP_PERFMON+\
         CAP_NET_ADMIN; CapEff={cap_eff:#x}), or set BPFPOLY_SKIP_PRIVILEGED=1 to skip them"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "BPF unavailable for these tests: the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    );
    assert!(
        Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        "BPF unavailable: the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL)"
    );
    ensure_mounts();
    true
}

macro_rules! require_privileges {
    () => {
        if !$crate::ebpf_support::privileged() {
            return;
        }
    };
}

/// bpffs (for `bpftool prog loadall` pins) and tracefs (tracepoint attach).
pub fn ensure_mounts() {
    static MOUNTED: OnceLock<()> = OnceLock::new();
    MOUNTED.get_or_init(|| {
        for (fstype, target) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
            let mounts = fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
            let mounted = mounts.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, dir, ty) = (f.next(), f.next(), f.next());
                dir == Some(target) && ty == Some(fstype)
            });
            if !mounted {
                let status = Command::new("mount")
                    .args(["-t", fstype, fstype, target])
                    .status()
                    .expect("running mount");
                assert!(
                    status.success(),
                    "mount -t {fstype} {fstype} {target} failed"
                );
            }
        }
    });
}

/// A name no other test (or test process) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn object(name: &str) -> &'static [u8] {
    builtin::builtin(name)
        .unwrap_or_else(|| panic!("no built-in object {name}; have {:?}", builtin::names()))
}

pub fn errno(err: &ProgramError) -> Option<i32> {
    match err {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

pub const EPERM: i32 = 1;
pub const EINVAL: i32 = 22;

pub fn verifier_log(result: Result<(), ProgramError>, what: &str) -> String {
    match result {
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            assert!(
                !log.trim().is_empty(),
                "{what}: empty verifier log ({io_error})"
            );
            log
        }
        Err(other) => panic!("{what}: expected a verifier rejection, got {other}"),
        Ok(()) => panic!("{what}: loaded, but it is designed to be rejected"),
    }
}

pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Programs of each object and how to load them with aya.
pub fn load_all_programs(ebpf: &mut Ebpf) -> Vec<(String, Result<(), ProgramError>)> {
    let btf = Btf::from_sys_fs().expect("kernel BTF");
    let mut results = Vec::new();
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    for name in names {
        let program = ebpf.program_mut(&name).expect("listed program");
        let result = match program {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::TracePoint(p) => p.load(),
            aya::programs::Program::RawTracePoint(p) => p.load(),
            aya::programs::Program::KProbe(p) => p.load(),
            aya::programs::Program::BtfTracePoint(p) => p.load("sched_process_exec", &btf),
            other => panic!("{name}: unexpected program type {:?}", other.prog_type()),
        };
        results.push((name, result));
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    results
}
