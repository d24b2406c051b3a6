//! The programs under test, loaded with aya: the classifier builds (empty, direct, static,
//! tail call), libxdp's dispatcher, and the freplace attempt.

use std::path::Path;

use aya::{
    maps::{MapData, ProgramArray},
    programs::{Extension, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};

pub const XDP_PASS: u32 = 2;
/// libxdp's `XDP_DISPATCHER_RETVAL`: what an empty slot returns.
const XDP_DISPATCHER_RETVAL: u32 = 31;
/// libxdp's `XDP_DISPATCHER_MAGIC` and the dispatcher version of libxdp 1.3.
const XDP_DISPATCHER_MAGIC: u8 = 236;
const XDP_DISPATCHER_VERSION: u8 = 2;
const ALL_HANDLERS_MASK: u64 = (1 << 1) | (1 << 6) | (1 << 17);

pub struct Subject {
    pub key: &'static str,
    pub ebpf: Ebpf,
    program: &'static str,
    // Keeps the PROG_ARRAY's user reference (the kernel empties it on the last close).
    _table: Option<ProgramArray<MapData>>,
}

impl Subject {
    pub fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(self.program)
            .unwrap_or_else(|| panic!("{}: no program {}", self.key, self.program))
            .try_into()
            .expect("an XDP program")
    }

    pub fn id(&self) -> u32 {
        self.xdp().info().expect("program info").id()
    }

    /// One BPF_PROG_TEST_RUN of `repeat` iterations: (cpu ns/packet, kernel ns/packet, verdict).
    pub fn run(&self, frame: &[u8], repeat: u32) -> (f64, u32, u32) {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let xdp = self.xdp();
        let t0 = thread_cpu_ns();
        let r = Xdp::test_run(xdp, opts)
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e}", self.key));
        let t1 = thread_cpu_ns();
        (
            (t1 - t0) as f64 / f64::from(repeat),
            r.duration.as_nanos() as u32,
            r.return_value,
        )
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn load_xdp_programs(ebpf: &mut Ebpf, what: &str) {
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    for name in names {
        let p: &mut Xdp = ebpf
            .program_mut(&name)
            .unwrap()
            .try_into()
            .unwrap_or_else(|e| panic!("{what}/{name}: {e}"));
        p.load().unwrap_or_else(|e| panic!("{what}/{name}: {e}"));
    }
}

fn classifier_loader<'a>(mode: &'a u32, mask: &'a u64) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader
        .override_global("count_bytes", &1u8, true)
        .override_global("vlan_aware", &1u8, true)
        .override_global("bpfpoly_dispatch_mode", mode, true)
        .override_global("bpfpoly_handler_mask", mask, true);
    loader
}

pub fn builtin(name: &str) -> &'static [u8] {
    bpfpoly_agent::builtin::builtin(name).unwrap_or_else(|| panic!("no built-in object {name}"))
}

pub fn classifier(key: &'static str, bytes: &[u8], mode: u32, fill_table: bool) -> Subject {
    let mask = ALL_HANDLERS_MASK;
    let mut ebpf = classifier_loader(&mode, &mask)
        .load(bytes)
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    load_xdp_programs(&mut ebpf, key);
    let table = fill_table.then(|| {
        let mut table = ProgramArray::try_from(ebpf.take_map("jump_table").expect("jump_table"))
            .expect("jump_table is a PROG_ARRAY");
        for (handler, k) in [("handle_icmp", 1), ("handle_tcp", 6), ("handle_udp", 17)] {
            let fd = ebpf.program(handler).unwrap().fd().unwrap();
            table.set(k, fd, 0).expect("filling jump_table");
        }
        table
    });
    Subject {
        key,
        ebpf,
        program: "classify",
        _table: table,
    }
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// libxdp's dispatcher with one program slot configured and left unfilled.
pub fn libxdp(path: &Path) -> Subject {
    // struct xdp_dispatcher_config (libxdp 1.3, 124 bytes): magic, dispatcher_version,
    // num_progs_enabled, is_xdp_frags, chain_call_actions[10], run_prios[10],
    // program_flags[10].
    let mut conf = [0u8; 124];
    conf[0] = XDP_DISPATCHER_MAGIC;
    conf[1] = XDP_DISPATCHER_VERSION;
    conf[2] = 1;
    let chain = (1u32 << XDP_PASS) | (1u32 << XDP_DISPATCHER_RETVAL);
    conf[4..8].copy_from_slice(&chain.to_ne_bytes());
    conf[44..48].copy_from_slice(&50u32.to_ne_bytes()); // run_prios[0]: libxdp's default
    let bytes = read(path);
    let mut ebpf = EbpfLoader::new()
        .override_global("conf", &conf, true)
        .load(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let p: &mut Xdp = ebpf
        .program_mut("xdp_dispatcher")
        .expect("xdp_dispatcher in the libxdp object")
        .try_into()
        .unwrap();
    p.load()
        .unwrap_or_else(|e| panic!("libxdp xdp_dispatcher: {e}"));
    Subject {
        key: "libxdp",
        ebpf,
        program: "xdp_dispatcher",
        _table: None,
    }
}

/// Tries freplace dispatch; Err(reason) where the kernel refuses it.
pub fn try_freplace() -> Result<Subject, String> {
    let mode = 2u32;
    let mask = ALL_HANDLERS_MASK;
    let mut entry = classifier_loader(&mode, &mask)
        .load(builtin("packet-classifier-xdp"))
        .map_err(|e| format!("entry object: {e}"))?;
    load_xdp_programs(&mut entry, "freplace entry");
    let classify_fd = entry
        .program("classify")
        .unwrap()
        .fd()
        .unwrap()
        .try_clone()
        .map_err(|e| e.to_string())?;
    let mut ext = EbpfLoader::new()
        .load(builtin("packet-classifier-freplace"))
        .map_err(|e| format!("freplace object: {e}"))?;
    let p: &mut Extension = ext
        .program_mut("handle_tcp")
        .ok_or("no handle_tcp in the freplace object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    match p.load(classify_fd, "bpfpoly_slot_6") {
        Ok(()) => Err(
            "freplace loaded: this kernel allows trampolines; measuring it is not implemented \
             in this benchmark (the maps would have to be shared by pinning)"
                .into(),
        ),
        Err(e) => {
            let errno = match &e {
                aya::programs::ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
                _ => None,
            };
            Err(match errno {
                Some(1) => "not available here: EPERM, no trampolines (BPF_PROG_TYPE_EXT refused \
                            at load with an empty verifier log)"
                    .to_owned(),
                _ => format!("not available here: {e}"),
            })
        }
    }
}
