//! Dispatch overhead with BPF_PROG_TEST_RUN (part 1 of `make bench`, `e2e/bench/bench.sh`).
//!
//! Runs the same frames through the same handler work behind each dispatch mechanism and
//! prints one JSON document: result rows (`{name, value, unit, anchor, anchor_value,
//! ratio, target, met}`) and the raw samples.
//!
//! What runs (all XDP, all loaded here with aya, all given the same frame):
//! - `empty`: the classifier source built with `CLASSIFIER_ENTRY_HOOK` = `return
//!   XDP_PASS` (bench.sh builds it): the cost of the test_run loop itself.
//! - `direct`: the classifier source built with a `CLASSIFIER_ENTRY_HOOK` that parses and
//!   runs the handler body (`classifier_account`) and returns: the same parse + handler
//!   work with no dispatch at all (no key switch, no `bpfpoly_dispatch` counter, no tail
//!   call). The floor.
//! - `static`: built-in `packet-classifier-xdp`, `bpfpoly_dispatch_mode` = 1 (static),
//!   `bpfpoly_handler_mask` = the three handlers.
//! - `tailcall`: built-in `packet-classifier-xdp`, mode 0, `jump_table` filled with
//!   `handle_icmp`/`handle_tcp`/`handle_udp`.
//! - `libxdp`: libxdp's `xdp-dispatcher.o` with `.rodata` `conf` saying one program slot
//!   (`num_progs_enabled` = 1, `chain_call_actions[0]` = PASS | XDP_DISPATCHER_RETVAL, as
//!   libxdp writes it). libxdp fills slots with freplace, which this kernel refuses
//!   (EPERM), so `prog0` stays the stub: this measures the dispatcher's own cost. Its cost
//!   with the handler is estimated as `direct + (libxdp - empty)`.
//! - freplace: tried (classifier with mode 2 + the freplace object); reported as not
//!   available when the kernel refuses it.
//!
//! Timing: for each run, `repeat` iterations in one BPF_PROG_TEST_RUN; ns per packet =
//! this thread's CPU time across the syscall / repeat (CLOCK_THREAD_CPUTIME_ID: excludes
//! time the thread was preempted, which the wall clock would count on a busy machine;
//! sub-ns resolution, unlike the kernel's `duration`, which is already divided by
//! `repeat` and truncated to whole ns; it is kept as a cross-check). Configurations are
//! interleaved within each round so drift hits all of them alike.
//!
//! Usage (root): `bench_dispatch --direct D.o --empty E.o [--libxdp X.o] [--runs N]
//! [--repeat R] [--jited-dir DIR]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{MapData, ProgramArray},
    programs::{Extension, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use serde_json::{json, Value};

const XDP_PASS: u32 = 2;
/// libxdp's `XDP_DISPATCHER_RETVAL`: what an empty slot returns.
const XDP_DISPATCHER_RETVAL: u32 = 31;
/// libxdp's `XDP_DISPATCHER_MAGIC` and the dispatcher version of libxdp 1.3.
const XDP_DISPATCHER_MAGIC: u8 = 236;
const XDP_DISPATCHER_VERSION: u8 = 2;
const ALL_HANDLERS_MASK: u64 = (1 << 1) | (1 << 6) | (1 << 17);

struct Args {
    direct: PathBuf,
    empty: PathBuf,
    libxdp: Option<PathBuf>,
    runs: usize,
    repeat: u32,
    jited_dir: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        direct: PathBuf::new(),
        empty: PathBuf::new(),
        libxdp: None,
        runs: 9,
        repeat: 1_000_000,
        jited_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--direct" => a.direct = value().into(),
            "--empty" => a.empty = value().into(),
            "--libxdp" => a.libxdp = Some(value().into()),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--repeat" => a.repeat = value().parse().expect("--repeat N"),
            "--jited-dir" => a.jited_dir = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.direct.as_os_str().is_empty() && !a.empty.as_os_str().is_empty(),
        "usage: bench_dispatch --direct D.o --empty E.o [--libxdp X.o] [--runs N] [--repeat R]"
    );
    assert!(a.runs >= 5, "--runs must be at least 5");
    assert!(a.repeat >= 1_000_000, "--repeat must be at least 1000000");
    a
}

// ---------------------------------------------------------------------------
// Frames (the same bytes for every configuration)
// ---------------------------------------------------------------------------

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet + IPv4 (no options) + TCP SYN (20 bytes) + 8 payload bytes.
fn ipv4_tcp() -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&443u16.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = 0x02;
    l4.extend_from_slice(b"bpfpoly!");
    let mut f = eth(0x0800);
    let total = 20 + l4.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend(l4);
    f
}

/// Ethernet + IPv6 + UDP (8 bytes) + 8 payload bytes.
fn ipv6_udp() -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&5353u16.to_be_bytes());
    l4[2..4].copy_from_slice(&53u16.to_be_bytes());
    l4.extend_from_slice(b"bpfpoly!");
    let mut f = eth(0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend(l4);
    f
}

// ---------------------------------------------------------------------------
// Programs under test
// ---------------------------------------------------------------------------

struct Subject {
    key: &'static str,
    ebpf: Ebpf,
    program: &'static str,
    // Keeps the PROG_ARRAY's user reference (the kernel empties it on the last close).
    _table: Option<ProgramArray<MapData>>,
}

impl Subject {
    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(self.program)
            .unwrap_or_else(|| panic!("{}: no program {}", self.key, self.program))
            .try_into()
            .expect("an XDP program")
    }

    fn id(&self) -> u32 {
        self.xdp().info().expect("program info").id()
    }

    /// One BPF_PROG_TEST_RUN of `repeat` iterations: (cpu ns/packet, kernel ns/packet, verdict).
    fn run(&self, frame: &[u8], repeat: u32) -> (f64, u32, u32) {
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

fn builtin(name: &str) -> &'static [u8] {
    bpfpoly_agent::builtin::builtin(name).unwrap_or_else(|| panic!("no built-in object {name}"))
}

fn classifier(key: &'static str, bytes: &[u8], mode: u32, fill_table: bool) -> Subject {
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

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// libxdp's dispatcher with one program slot configured and left unfilled.
fn libxdp(path: &Path) -> Subject {
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
fn try_freplace() -> Result<Subject, String> {
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

/// The JIT'd images of a program (one per function: the program and its subprograms)
/// with their kernel addresses, from BPF_OBJ_GET_INFO_BY_FD (this bpftool has no
/// disassembler: "No libbfd support").
fn jited_images(fd: i32) -> Vec<(u64, Vec<u8>)> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_prog_info up to jited_func_lens (128 bytes).
    let mut info = [0u8; 128];
    let call = |info: &mut [u8; 128]| {
        // union bpf_attr.info: bpf_fd u32, info_len u32, info u64.
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: the kernel writes at most info_len bytes into `info`, and into the
        // user buffers whose addresses and sizes `info` names.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        rc == 0
    };
    let u32_at = |b: &[u8; 128], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    if !call(&mut info) {
        return Vec::new();
    }
    let jited_len = u32_at(&info, 16) as usize;
    let nr_ksyms = u32_at(&info, 104) as usize;
    let nr_lens = u32_at(&info, 108) as usize;
    if jited_len == 0 || nr_ksyms == 0 || nr_ksyms != nr_lens {
        return Vec::new();
    }
    let mut insns = vec![0u8; jited_len];
    let mut ksyms = vec![0u64; nr_ksyms];
    let mut lens = vec![0u32; nr_lens];
    let mut info = [0u8; 128];
    info[16..20].copy_from_slice(&(jited_len as u32).to_ne_bytes());
    info[24..32].copy_from_slice(&(insns.as_mut_ptr() as u64).to_ne_bytes());
    info[104..108].copy_from_slice(&(nr_ksyms as u32).to_ne_bytes());
    info[108..112].copy_from_slice(&(nr_lens as u32).to_ne_bytes());
    info[112..120].copy_from_slice(&(ksyms.as_mut_ptr() as u64).to_ne_bytes());
    info[120..128].copy_from_slice(&(lens.as_mut_ptr() as u64).to_ne_bytes());
    if !call(&mut info) {
        return Vec::new();
    }
    let mut images = Vec::new();
    let mut at = 0usize;
    for (addr, len) in ksyms.iter().zip(&lens) {
        let len = *len as usize;
        if at + len > insns.len() {
            break;
        }
        images.push((*addr, insns[at..at + len].to_vec()));
        at += len;
    }
    images
}

/// Kernel symbols by address (root sees the addresses).
fn kallsyms() -> BTreeMap<u64, String> {
    std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let name = f.nth(1)?;
            (addr != 0).then(|| (addr, name.to_owned()))
        })
        .collect()
}

/// Writes DIR/NAME.jited.txt (x86-64 disassembly by objdump, call and jump targets
/// named from kallsyms) and DIR/NAME.xlated.txt (`bpftool prog dump xlated`), and
/// returns how many return thunks, indirect-branch thunks and calls the image has.
fn dump_jited(dir: &Path, name: &str, xdp: &Xdp, syms: &BTreeMap<u64, String>) -> Value {
    use std::os::fd::{AsFd, AsRawFd};
    let _ = std::fs::create_dir_all(dir);
    let id = xdp.info().map(|i| i.id()).unwrap_or(0);
    let fd = xdp.fd().unwrap().as_fd().as_raw_fd();
    let mut text = String::new();
    let (mut ret_thunks, mut indirect_thunks, mut calls, mut bytes) = (0, 0, 0, 0);
    for (i, (addr, image)) in jited_images(fd).iter().enumerate() {
        bytes += image.len();
        let bin = dir.join(format!("{name}.{i}.bin"));
        if std::fs::write(&bin, image).is_err() {
            continue;
        }
        let out = Command::new("objdump")
            .args([
                "-D",
                "-b",
                "binary",
                "-m",
                "i386:x86-64",
                "--no-show-raw-insn",
            ])
            .arg(format!("--adjust-vma={addr:#x}"))
            .arg(&bin)
            .output();
        let _ = std::fs::remove_file(&bin);
        let Ok(out) = out else { continue };
        text.push_str(&format!(
            "; function {i} at {addr:#x}, {} bytes\n",
            image.len()
        ));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut line = line.to_owned();
            let target = line
                .rsplit(' ')
                .next()
                .and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
            let is_branch = line.contains("call") || line.contains("jmp");
            if let (true, Some(t)) = (is_branch, target) {
                if let Some((base, sym)) = syms.range(..=t).next_back() {
                    if t - base < 0x1000 && !sym.starts_with("bpf_prog_") {
                        line.push_str(&format!("  <{sym}+{:#x}>", t - base));
                        if sym.contains("return_thunk") || sym.contains("safe_ret") {
                            ret_thunks += 1;
                        } else if sym.contains("indirect_thunk") {
                            indirect_thunks += 1;
                        } else if line.contains("call") {
                            calls += 1;
                        }
                    }
                }
            }
            if line.contains("call") && target.is_some_and(|t| t >= 0xffff_ffff_a000_0000) {
                calls += 1; // BPF-to-BPF calls (JIT'd code is above the kernel text)
            }
            text.push_str(&line);
            text.push('\n');
        }
    }
    let _ = std::fs::write(dir.join(format!("{name}.jited.txt")), text);
    if let Ok(o) = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
    {
        let _ = std::fs::write(dir.join(format!("{name}.xlated.txt")), &o.stdout);
    }
    json!({"jited_bytes": bytes, "return_thunks": ret_thunks,
           "indirect_branch_thunks": indirect_thunks, "calls": calls})
}

// ---------------------------------------------------------------------------
// Statistics and rows
// ---------------------------------------------------------------------------

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

#[allow(clippy::too_many_arguments)]
fn row(
    name: String,
    value: Option<f64>,
    unit: &str,
    anchor: Option<String>,
    anchor_value: Option<f64>,
    target: Option<f64>,
    target_text: Option<&str>,
) -> Value {
    let ratio = match (value, anchor_value) {
        (Some(v), Some(a)) if a > 0.0 => Some(round(v / a, 3)),
        _ => None,
    };
    let met = match (ratio, target) {
        (Some(r), Some(t)) => Some(r <= t),
        _ => None,
    };
    json!({
        "name": name, "value": value.map(|v| round(v, 2)), "unit": unit,
        "anchor": anchor, "anchor_value": anchor_value.map(|v| round(v, 2)),
        "ratio": ratio, "target": target_text, "met": met,
    })
}

fn main() {
    let args = args();
    // One CPU, so the per-CPU maps and caches stay put between runs.
    // SAFETY: plain libc calls on a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }

    let direct_bytes = read(&args.direct);
    let empty_bytes = read(&args.empty);
    let mut subjects = vec![
        classifier("empty", &empty_bytes, 0, false),
        classifier("direct", &direct_bytes, 1, false),
        classifier("static", builtin("packet-classifier-xdp"), 1, false),
        classifier("tailcall", builtin("packet-classifier-xdp"), 0, true),
    ];
    let mut libxdp_note = None;
    match &args.libxdp {
        Some(p) if p.exists() => subjects.push(libxdp(p)),
        Some(p) => libxdp_note = Some(format!("{} not found", p.display())),
        None => libxdp_note = Some("no --libxdp object given".to_owned()),
    }
    let freplace = match try_freplace() {
        Ok(_) => "loaded".to_owned(),
        Err(reason) => reason,
    };

    let mut jit = serde_json::Map::new();
    if let Some(dir) = &args.jited_dir {
        let syms = kallsyms();
        for s in &subjects {
            jit.insert(s.key.to_owned(), dump_jited(dir, s.key, s.xdp(), &syms));
        }
        // The handler the tail call jumps to.
        if let Some(t) = subjects.iter().find(|s| s.key == "tailcall") {
            let handler: &Xdp = t.ebpf.program("handle_tcp").unwrap().try_into().unwrap();
            jit.insert(
                "tailcall handle_tcp".into(),
                dump_jited(dir, "tailcall-handle_tcp", handler, &syms),
            );
        }
    }

    let frames = [("ipv4-tcp", ipv4_tcp()), ("ipv6-udp", ipv6_udp())];
    // Every subject returns PASS for these frames (the dispatcher through its chain).
    for (fname, frame) in &frames {
        for s in &subjects {
            let (_, _, verdict) = s.run(frame, 1);
            assert_eq!(verdict, XDP_PASS, "{}/{fname}: verdict", s.key);
        }
    }
    // Warm up (JIT'd images and maps into cache, CPU frequency up).
    for (_, frame) in &frames {
        for s in &subjects {
            s.run(frame, args.repeat / 4);
        }
    }

    // samples[frame][subject] = (cpu ns/pkt, kernel ns/pkt) per run
    let mut cpu: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut kernel: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let n = subjects.len();
    for round_i in 0..args.runs {
        for (fname, frame) in &frames {
            for j in 0..n {
                // Rotate the order each round.
                let s = &subjects[(j + round_i) % n];
                let (c, k, _) = s.run(frame, args.repeat);
                cpu.entry((fname, s.key)).or_default().push(c);
                kernel.entry((fname, s.key)).or_default().push(f64::from(k));
            }
        }
    }

    let mut rows = Vec::new();
    let mut detail = serde_json::Map::new();
    for (fname, _) in &frames {
        let get = |key: &str, stat: fn(&[f64]) -> f64| cpu.get(&(*fname, key)).map(|v| stat(v));
        for (stat_name, stat) in [("min", min as fn(&[f64]) -> f64), ("median", median)] {
            let direct = get("direct", stat);
            let empty = get("empty", stat);
            let stat_ = stat;
            let libxdp_raw = get("libxdp", stat_);
            let libxdp_est = match (direct, libxdp_raw, empty) {
                (Some(d), Some(l), Some(e)) => Some(d + (l - e)),
                _ => None,
            };
            let p = format!("dispatch {fname} {stat_name}");
            rows.push(row(
                format!("{p}: empty XDP program (test_run loop)"),
                empty,
                "ns/pkt",
                None,
                None,
                None,
                None,
            ));
            rows.push(row(
                format!("{p}: direct handler, no dispatch (floor)"),
                direct,
                "ns/pkt",
                Some("empty XDP program".into()),
                empty,
                None,
                None,
            ));
            rows.push(row(
                format!("{p}: static dispatch (fastest here)"),
                get("static", stat),
                "ns/pkt",
                Some("direct handler".into()),
                direct,
                Some(1.10),
                Some("ratio <= 1.10"),
            ));
            rows.push(row(
                format!("{p}: tail-call dispatch"),
                get("tailcall", stat),
                "ns/pkt",
                Some("direct handler".into()),
                direct,
                Some(1.50),
                Some("ratio <= 1.50"),
            ));
            rows.push(row(
                format!("{p}: libxdp dispatcher, 1 slot unfilled (raw)"),
                libxdp_raw,
                "ns/pkt",
                Some("empty XDP program".into()),
                empty,
                None,
                None,
            ));
            rows.push(row(
                format!("{p}: libxdp dispatcher + handler (est. direct + dispatcher - empty)"),
                libxdp_est,
                "ns/pkt",
                Some("direct handler".into()),
                direct,
                None,
                None,
            ));
            rows.push(row(
                format!("{p}: static vs libxdp"),
                get("static", stat),
                "ns/pkt",
                Some("libxdp + handler (est.)".into()),
                libxdp_est,
                Some(1.0),
                Some("ratio <= 1.00"),
            ));
            rows.push(row(
                format!("{p}: tail call vs libxdp"),
                get("tailcall", stat),
                "ns/pkt",
                Some("libxdp + handler (est.)".into()),
                libxdp_est,
                Some(1.0),
                Some("ratio <= 1.00"),
            ));
        }
        let mut per = serde_json::Map::new();
        for s in &subjects {
            per.insert(
                s.key.to_owned(),
                json!({
                    "cpu_ns_per_pkt": cpu[&(*fname, s.key)].iter().map(|x| round(*x, 3)).collect::<Vec<_>>(),
                    "kernel_duration_ns": kernel[&(*fname, s.key)],
                }),
            );
        }
        detail.insert((*fname).to_owned(), Value::Object(per));
    }
    // Kernel run-time statistics (BPF_ENABLE_STATS, held by any process, e.g. a running
    // bpfpoly agent) add two clock reads to every program run: flag them, they skew the floor.
    let stats_on = subjects
        .iter()
        .any(|s| s.xdp().info().map(|i| i.run_count() > 0).unwrap_or(false));
    if stats_on {
        rows.push(json!({
            "name": "dispatch: WARNING kernel BPF run-time statistics were ON during these runs",
            "value": null, "unit": "n/a", "anchor": null, "anchor_value": null, "ratio": null,
            "target": null, "met": null,
            "note": "BPF_ENABLE_STATS was held by another process (e.g. a running bpfpoly agent, \
                     `make run`): every program run also pays two clock reads, so every figure \
                     above includes that constant and the ratios understate the dispatch overhead",
        }));
    }
    rows.push(json!({
        "name": "dispatch: freplace dispatch", "value": null, "unit": "n/a",
        "anchor": "direct handler", "anchor_value": null, "ratio": null,
        "target": "ratio <= 1.10", "met": null, "note": freplace,
    }));

    let doc = json!({
        "section": "dispatch",
        "runs": args.runs,
        "repeat": args.repeat,
        "clock": "CLOCK_THREAD_CPUTIME_ID across BPF_PROG_TEST_RUN / repeat",
        "program_ids": subjects.iter().map(|s| (s.key, s.id())).collect::<BTreeMap<_, _>>(),
        "freplace": freplace,
        "kernel_run_stats_on": stats_on,
        "jit": jit,
        "libxdp_note": libxdp_note,
        "rows": rows,
        "samples": detail,
    });
    println!("{doc}");
}
