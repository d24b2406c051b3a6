//! The exec tracer and comm-stats on the real kernel: real execs reported through the ring
//! buffer or perf, loginuid read or not as configured, and a kprobe attach that fails at the
//! attach stage where the kernel has no kprobes.
//!
//! Needs root (CAP_BPF/CAP_SYS_ADMIN) and BTF. `BPFPOLY_SKIP_PRIVILEGED=1` skips
//! every test with a message; without it a missing privilege is a failure.

#[path = "../src/builtin.rs"]
mod builtin;
#[macro_use]
#[path = "../../test-support/ebpf_support.rs"]
mod ebpf_support;

use std::{
    io::ErrorKind,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, PerfEventArray, RingBuf},
    programs::{
        kprobe::KProbeError, BtfTracePoint, KProbe, ProgramError, RawTracePoint, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};

use ebpf_support::*;

// ---------------------------------------------------------------------------
// exec-tracer
// ---------------------------------------------------------------------------

/// A decoded BPFPOLY_EVENT_EXEC record (layout in ebpf/include/bpfpoly.h).
#[derive(Debug)]
struct ExecEvent {
    pid: u32,
    ppid: u32,
    loginuid: u32,
    flags: u32,
    comm: String,
    filename: String,
}

const EXEC_EVENT_LEN: usize = 296;
const HAS_LOGINUID: u32 = 1;

fn decode_exec(record: &[u8]) -> ExecEvent {
    let u32_at = |off: usize| u32::from_ne_bytes(record[off..off + 4].try_into().expect("4 bytes"));
    let cstr = |range: std::ops::Range<usize>| {
        let bytes = &record[range];
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    assert!(
        record.len() >= EXEC_EVENT_LEN,
        "short record: {} bytes",
        record.len()
    );
    assert_eq!(u32_at(0), 1, "kind BPFPOLY_EVENT_EXEC");
    assert_eq!(u32_at(4) as usize, EXEC_EVENT_LEN, "len");
    ExecEvent {
        pid: u32_at(8),
        ppid: u32_at(12),
        loginuid: u32_at(16),
        flags: u32_at(20),
        comm: cstr(24..40),
        filename: cstr(40..296),
    }
}

enum Events {
    Ring(RingBuf<MapData>),
    Perf(Vec<aya::maps::perf::PerfEventArrayBuffer<MapData>>),
}

impl Events {
    fn open(ebpf: &mut Ebpf, use_ringbuf: bool) -> Self {
        if use_ringbuf {
            Self::Ring(
                RingBuf::try_from(ebpf.take_map("events").expect("events")).expect("RINGBUF"),
            )
        } else {
            let mut array =
                PerfEventArray::try_from(ebpf.take_map("events_perf").expect("events_perf"))
                    .expect("PERF_EVENT_ARRAY");
            let cpus = aya::util::online_cpus().expect("online CPUs");
            Self::Perf(
                cpus.into_iter()
                    .map(|cpu| array.open(cpu, None).expect("opening a perf buffer"))
                    .collect(),
            )
        }
    }

    fn drain(&mut self, into: &mut Vec<ExecEvent>) {
        match self {
            Self::Ring(ring) => {
                while let Some(item) = ring.next() {
                    into.push(decode_exec(&item));
                }
            }
            Self::Perf(buffers) => {
                for buf in buffers {
                    buf.for_each(|event| {
                        if let aya::maps::perf::PerfEvent::Sample { head, tail } = event {
                            let record = [head, tail].concat();
                            into.push(decode_exec(&record));
                        }
                    });
                }
            }
        }
    }
}

/// The loginuid the test gives its exec'ing child (4294967295 means unset).
const CHILD_LOGINUID: u32 = 4242;

/// Runs `/bin/sh -c '...; exec /bin/true'`. The shell sets its audit loginuid
/// to CHILD_LOGINUID where it may (root, audit, loginuid not yet locked) and
/// prints the value it ends up with. Returns the child pid, that value (None
/// without audit) and the two exec events of the pid, in order.
fn exec_and_capture(events: &mut Events) -> (u32, Option<u32>, Vec<ExecEvent>) {
    let script = format!(
        "echo {CHILD_LOGINUID} > /proc/self/loginuid 2>/dev/null; \
         if [ -e /proc/self/loginuid ]; then read -r uid < /proc/self/loginuid; echo \"$uid\"; fi; \
         exec /bin/true"
    );
    let child = Command::new("/bin/sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning /bin/sh");
    let pid = child.id();
    let output = child.wait_with_output().expect("waiting for the child");
    assert!(output.status.success(), "child failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let loginuid = stdout
        .lines()
        .next()
        .map(|l| l.trim().parse().expect("numeric loginuid"));

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        events.drain(&mut seen);
        seen.retain(|e| e.pid == pid);
        if seen.len() >= 2 {
            return (pid, loginuid, seen);
        }
        assert!(
            Instant::now() < deadline,
            "expected 2 exec events for pid {pid} within 10 s, got {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn exec_tracer(name: &str, use_ringbuf: bool, read_loginuid: bool) -> Ebpf {
    let flag = |b: bool| if b { &1u8 } else { &0u8 };
    EbpfLoader::new()
        .override_global("use_ringbuf", flag(use_ringbuf), true)
        .override_global("read_loginuid", flag(read_loginuid), true)
        .load(object(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn attach_exec_tracer(ebpf: &mut Ebpf, name: &str) {
    let program = ebpf.program_mut("on_exec").expect("on_exec");
    match name {
        "exec-tracer-tpbtf" => {
            let p: &mut BtfTracePoint = program.try_into().expect("tp_btf");
            let btf = Btf::from_sys_fs().expect("kernel BTF");
            p.load("sched_process_exec", &btf).expect("loading on_exec");
            p.attach().expect("attaching tp_btf/sched_process_exec");
        }
        "exec-tracer-tracepoint" => {
            let p: &mut TracePoint = program.try_into().expect("tracepoint");
            p.load().expect("loading on_exec");
            p.attach("sched", "sched_process_exec")
                .expect("attaching tracepoint/sched/sched_process_exec");
        }
        other => panic!("no attach recipe for {other}"),
    }
}

/// Both comm-stats variants count an exec of `true` (comm "true", 4 characters) in
/// bucket 4 of `comm_len`.
#[test]
fn comm_stats_counts_the_length_of_an_execed_command_name() {
    require_privileges!();
    ensure_mounts();
    for name in ["comm-stats-loop", "comm-stats-bounded"] {
        let mut ebpf = EbpfLoader::new()
            .load(object(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let p: &mut RawTracePoint = ebpf
            .program_mut("on_exec")
            .expect("on_exec")
            .try_into()
            .expect("raw tracepoint");
        p.load()
            .unwrap_or_else(|e| panic!("{name}: loading on_exec: {e}"));
        p.attach("sched_process_exec")
            .unwrap_or_else(|e| panic!("{name}: attaching: {e}"));
        let bucket = |ebpf: &Ebpf| -> u64 {
            let map: aya::maps::Array<_, u64> =
                aya::maps::Array::try_from(ebpf.map("comm_len").expect("comm_len")).unwrap();
            map.get(&4, 0).unwrap()
        };
        let before = bucket(&ebpf);
        for _ in 0..3 {
            let status = std::process::Command::new("/bin/true").status().unwrap();
            assert!(status.success());
        }
        // Other processes may exec meanwhile; our three are the floor.
        let after = bucket(&ebpf);
        assert!(
            after >= before + 3,
            "{name}: bucket 4 went {before} -> {after}"
        );
    }
}

fn assert_exec_reported(name: &str, use_ringbuf: bool, read_loginuid: bool) {
    let mut ebpf = exec_tracer(name, use_ringbuf, read_loginuid);
    let mut events = Events::open(&mut ebpf, use_ringbuf);
    attach_exec_tracer(&mut ebpf, name);
    let (pid, loginuid, mut execs) = exec_and_capture(&mut events);
    // A ring buffer keeps the order of the two execs; perf buffers are per CPU and are read
    // CPU by CPU, so when the process moved between its execs they arrive in either order.
    if !use_ringbuf {
        execs.sort_by_key(|e| e.comm != "sh");
    }
    let got: Vec<(&str, &str)> = execs
        .iter()
        .map(|e| (e.comm.as_str(), e.filename.as_str()))
        .collect();
    assert_eq!(
        got,
        [("sh", "/bin/sh"), ("true", "/bin/true")],
        "{name}: {execs:?}"
    );
    let (expected_flags, expected_uid) = match (read_loginuid, loginuid) {
        (true, Some(uid)) => (HAS_LOGINUID, uid),
        _ => (0, u32::MAX),
    };
    for event in &execs {
        assert_eq!(event.pid, pid, "{name}: {event:?}");
        assert_eq!(event.ppid, std::process::id(), "{name}: {event:?}");
        assert_eq!(event.flags, expected_flags, "{name}: {event:?}");
    }
    // The shell set its loginuid after its own exec; /bin/true inherits it.
    assert_eq!(execs[1].loginuid, expected_uid, "{name}: {:?}", execs[1]);
}

#[test]
fn exec_tracer_tpbtf_reports_an_exec_through_the_ring_buffer() {
    require_privileges!();
    assert_exec_reported("exec-tracer-tpbtf", true, true);
}

#[test]
fn exec_tracer_tracepoint_reports_an_exec_through_the_ring_buffer() {
    require_privileges!();
    assert_exec_reported("exec-tracer-tracepoint", true, true);
}

#[test]
fn exec_tracer_reports_through_perf_when_use_ringbuf_is_false() {
    require_privileges!();
    assert_exec_reported("exec-tracer-tpbtf", false, true);
    assert_exec_reported("exec-tracer-tracepoint", false, true);
}

#[test]
fn exec_tracer_leaves_loginuid_unset_when_read_loginuid_is_false() {
    require_privileges!();
    assert_exec_reported("exec-tracer-tpbtf", true, false);
}

/// The kprobe variant loads everywhere; attaching needs CONFIG_KPROBES. Where
/// the kprobe PMU is missing, the failure is an attach-stage error the agent
/// can tell from a verifier rejection.
#[test]
fn exec_tracer_kprobe_loads_and_attach_fails_at_the_attach_stage_without_kprobes() {
    require_privileges!();
    let mut ebpf = exec_tracer("exec-tracer-kprobe", true, true);
    let kprobe: &mut KProbe = ebpf
        .program_mut("on_exec")
        .expect("on_exec")
        .try_into()
        .expect("kprobe");
    kprobe
        .load()
        .expect("the kprobe variant loads even without kprobes");
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe/type");
    let result = kprobe.attach("finalize_exec", 0);
    if pmu.exists() {
        result.expect("attaching kprobe/finalize_exec where kprobes exist");
        return;
    }
    match result {
        Err(ProgramError::KProbeError(KProbeError::FileError { filename, io_error })) => {
            assert_eq!(filename, pmu);
            assert_eq!(io_error.kind(), ErrorKind::NotFound);
        }
        other => panic!(
            "expected KProbeError::FileError for {}, got {other:?}",
            pmu.display()
        ),
    }
}
