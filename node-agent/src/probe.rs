//! Feature probes against the running kernel (aya's `is_*_supported`, which load
//! a trivial program or create a tiny map and read the error).
//!
//! Probes can be wrong (vendor kernels, LSMs, trampolines that need more than the
//! probe tries), so what they say is kept apart from what a real load shows
//! (`observedProgramTypes`); a probe that cannot decide says why in a note rather
//! than guessing.

use std::{
    collections::BTreeMap,
    io,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use aya::{
    maps::MapType,
    programs::{LsmAttachType, ProgramError, ProgramType},
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use bpfpoly_agent::sys::{bpf_fd, ENOTSUPP};
use bpfpoly_crds::requirement::{helper_id, Query, MAP_TYPES, PROGRAM_TYPES};

use crate::btf::{KernelBtf, VMLINUX_BTF};

/// What the probes found on the running kernel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probed {
    /// Program types the probes report as supported (bpftool names, table order).
    pub program_types: Vec<String>,
    /// Map types the probes report as supported (bpftool names, table order).
    pub map_types: Vec<String>,
    /// Answers to `helper:` queries, keyed by the query string.
    pub helpers: BTreeMap<String, bool>,
    /// Probes that could not decide, and why.
    pub notes: Vec<String>,
    /// Wall time of the probes.
    pub duration: Duration,
}

/// Why a helper probe gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The program type is not one of `PROGRAM_TYPES`.
    #[error("unknown program type {0:?}")]
    UnknownProgramType(String),
    /// The helper is not one this agent's loader knows.
    #[error("unknown helper {0:?}")]
    UnknownHelper(String),
    /// The program type needs an attach target a bare probe cannot provide.
    #[error("helpers of {0} programs cannot be probed without an attach target")]
    NotProbeable(String),
    /// The probe syscall failed in a way that decides nothing (e.g. EPERM).
    #[error("probe of {what} failed: {reason}")]
    Failed {
        /// What was probed.
        what: String,
        /// The error.
        reason: String,
    },
}

/// The attach targets of the tracing and lsm program type probes, as aya's
/// `is_program_supported` names them: `bpf_fentry_test1` (the fentry target of the
/// kernel's BPF_PROG_TEST_RUN tests) and `bpf_lsm_bpf` (the BPF LSM hook of bpf()).
pub const FENTRY_TARGET: &str = "bpf_fentry_test1";
/// See [`FENTRY_TARGET`].
pub const LSM_TARGET: &str = "bpf_lsm_bpf";

/// BTF ids, in the running kernel's BTF, of [`FENTRY_TARGET`] and [`LSM_TARGET`];
/// 0 where the function is missing (the probe then reads the verifier's answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachTargets {
    /// `attach_btf_id` of the tracing (fentry) probe.
    pub fentry: u32,
    /// `attach_btf_id` of the lsm probe.
    pub lsm: u32,
}

impl AttachTargets {
    /// From BTF already parsed, which must be the running kernel's.
    pub fn from_btf(btf: &KernelBtf) -> AttachTargets {
        AttachTargets {
            fentry: btf.func_id(FENTRY_TARGET).unwrap_or(0),
            lsm: btf.func_id(LSM_TARGET).unwrap_or(0),
        }
    }

    /// Reads the running kernel's BTF for them (when the BTF at hand is another
    /// kernel's); all 0 when it cannot be read.
    pub fn from_running_kernel() -> AttachTargets {
        KernelBtf::load(std::path::Path::new(VMLINUX_BTF))
            .map(|b| AttachTargets::from_btf(&b))
            .unwrap_or_default()
    }
}

/// Probes every program type and map type, and the helpers `queries` ask about.
/// `targets` is called (at most once, after every other type probe) for the attach
/// targets of the tracing and lsm probes, so the caller can parse BTF meanwhile.
pub fn probe_all(queries: &[Query], targets: impl FnOnce() -> AttachTargets) -> Probed {
    let start = Instant::now();
    let mut probed = probe_features(targets);
    if probed.notes.iter().any(|n| n.starts_with(PROBES_SKIPPED)) {
        return probed;
    }
    for query in queries {
        let Query::Helper {
            program_type,
            helper,
        } = query
        else {
            continue;
        };
        let key = query.to_string();
        let answer = match probe_helper(program_type, helper) {
            Ok((answer, how)) => {
                if how == HelperProbe::RawTracepointProxy {
                    probed.notes.push(format!(
                        "{key}: probed with a raw_tracepoint program ({program_type} programs \
                         need an attach target to load); true is reliable, false may miss a \
                         helper only {program_type} programs have"
                    ));
                }
                answer
            }
            Err(e) => {
                probed.notes.push(format!("{key}: answered false: {e}"));
                false
            }
        };
        probed.helpers.insert(key, answer);
    }
    probed.duration = start.elapsed();
    probed
}

const PROBES_SKIPPED: &str = "feature probes skipped";

/// What one program type probe found.
enum TypeProbe {
    /// The loader has no program type of that name.
    Unknown,
    /// Supported or not.
    Answer(bool),
    /// The probe could not decide; why.
    Inconclusive(String),
}

/// Probes every program type and map type of the API tables, each once. The tracing
/// and lsm probes, which need `targets`, run last.
pub fn probe_features(targets: impl FnOnce() -> AttachTargets) -> Probed {
    let start = Instant::now();
    let mut probed = Probed::default();

    // Without CAP_BPF every probe fails the same way: say it once. The answer is
    // the array map type's too.
    let array = is_map_supported(MapType::Array);
    if let Err(e) = &array {
        if e.io_error.kind() == io::ErrorKind::PermissionDenied {
            probed.notes.push(format!(
                "{PROBES_SKIPPED}: creating a BPF map was refused ({}); \
                 run the agent as root or with CAP_BPF",
                e.io_error
            ));
            probed.duration = start.elapsed();
            return probed;
        }
    }
    let mut array = Some(array);

    let mut programs = Vec::with_capacity(PROGRAM_TYPES.len());
    let mut need_targets = Vec::new();
    for (i, (name, _)) in PROGRAM_TYPES.iter().enumerate() {
        programs.push(match program_type(name) {
            None => TypeProbe::Unknown,
            Some(pt) => match attach_target_kind(pt) {
                Some(kind) => {
                    need_targets.push((i, kind));
                    TypeProbe::Answer(false)
                }
                None => match is_program_supported(pt) {
                    Ok(ok) => TypeProbe::Answer(ok),
                    Err(e) => TypeProbe::Inconclusive(program_error(&e)),
                },
            },
        });
    }

    let mut map_notes = Vec::new();
    for (name, _) in MAP_TYPES {
        if let Some(id) = LOCAL_STORAGE_MAPS
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
        {
            match local_storage_supported(id) {
                Ok(true) => probed.map_types.push((*name).to_string()),
                Ok(false) => {}
                Err(e) => map_notes.push(format!("map type {name}: probe inconclusive ({e})")),
            }
            continue;
        }
        let Some(mt) = map_type(name) else {
            map_notes.push(format!("map type {name}: not known to the loader"));
            continue;
        };
        let answer = match mt {
            MapType::Array => array.take().unwrap_or_else(|| is_map_supported(mt)),
            _ => is_map_supported(mt),
        };
        match answer {
            Ok(true) => probed.map_types.push((*name).to_string()),
            Ok(false) => {}
            Err(e) => map_notes.push(format!(
                "map type {name}: probe inconclusive ({})",
                e.io_error
            )),
        }
    }

    if !need_targets.is_empty() {
        let targets = targets();
        for (i, kind) in need_targets {
            programs[i] = match attach_target_supported(kind, targets) {
                Ok(ok) => TypeProbe::Answer(ok),
                Err(e) => TypeProbe::Inconclusive(e),
            };
        }
    }
    for ((name, _), found) in PROGRAM_TYPES.iter().zip(programs) {
        match found {
            TypeProbe::Answer(true) => probed.program_types.push((*name).to_string()),
            TypeProbe::Answer(false) => {}
            TypeProbe::Unknown => probed
                .notes
                .push(format!("program type {name}: not known to the loader")),
            TypeProbe::Inconclusive(why) => probed.notes.push(format!(
                "program type {name}: probe inconclusive ({why}); a real load decides"
            )),
        }
    }
    probed.notes.extend(map_notes);
    probed.duration = start.elapsed();
    probed
}

/// The program types whose probe names an attach target by BTF id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttachTargetKind {
    /// `tracing` (fentry on [`FENTRY_TARGET`]).
    Fentry,
    /// `lsm` (BPF_LSM_MAC on [`LSM_TARGET`]).
    Lsm,
}

fn attach_target_kind(pt: ProgramType) -> Option<AttachTargetKind> {
    match pt {
        ProgramType::Tracing => Some(AttachTargetKind::Fentry),
        ProgramType::Lsm(LsmAttachType::Mac) => Some(AttachTargetKind::Lsm),
        _ => None,
    }
}

/// aya's `is_program_supported` for tracing and lsm, with the attach target's BTF
/// id given rather than parsed from the kernel's BTF again: load `r0 = 0; exit`
/// with the target; EINVAL with the verifier saying the target is missing still
/// means the type exists. A program that loads must also attach (kernels without
/// BPF trampolines load but refuse with ENOTSUPP). Errors read like aya's.
fn attach_target_supported(kind: AttachTargetKind, targets: AttachTargets) -> Result<bool, String> {
    let (prog_type, attach_type, attach_btf_id) = match kind {
        AttachTargetKind::Fentry => (
            bpf_prog_type::BPF_PROG_TYPE_TRACING,
            bpf_attach_type::BPF_TRACE_FENTRY,
            targets.fentry,
        ),
        AttachTargetKind::Lsm => (
            bpf_prog_type::BPF_PROG_TYPE_LSM,
            bpf_attach_type::BPF_LSM_MAC,
            targets.lsm,
        ),
    };
    // BPF_ALU64 | BPF_MOV | BPF_K to r0, imm 0; BPF_JMP | BPF_EXIT.
    let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
    let mut log = [0u8; 256];
    // SAFETY: `bpf_attr` is a union of plain integers; all-zero is valid.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the prog-load member of a zeroed union.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = prog_type as u32;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = c"GPL".as_ptr() as u64;
    load.log_level = 1;
    load.log_size = log.len() as u32;
    load.log_buf = log.as_mut_ptr() as u64;
    load.expected_attach_type = attach_type as u32;
    load.attach_btf_id = attach_btf_id;
    let prog = match bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => fd,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::EINVAL) => Ok(log.starts_with(b"Tracing programs must provide btf_id")),
                Some(libc::E2BIG) => Ok(false),
                _ => Err(format!("bpf_prog_load: {e}")),
            };
        }
    };
    // SAFETY: `bpf_attr` is a union of plain integers; all-zero is valid.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    match bpf_fd(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr) {
        // Dropping the link detaches it.
        Ok(_link) => Ok(true),
        Err(e) if e.raw_os_error() == Some(ENOTSUPP) => Ok(false),
        Err(e) => Err(format!("bpf_raw_tracepoint_open: {e}")),
    }
}

/// The local-storage map types, with their `enum bpf_map_type` numbers.
const LOCAL_STORAGE_MAPS: &[(&str, u32)] = &[
    ("sk_storage", 24),
    ("inode_storage", 28),
    ("task_storage", 29),
    ("cgrp_storage", 32),
];

/// Probes a local-storage map type without creating a map.
///
/// aya's probe makes the kernel allocate the map and then fail on a bad BTF fd;
/// that error path frees the map synchronously, waiting for RCU (tasks-trace)
/// grace periods: 30–300 ms per type here. The kernel's `map_alloc_check` for
/// these types rejects an oversized value with E2BIG before allocating
/// anything, while a map type the kernel lacks is EINVAL (no ops for it).
fn local_storage_supported(map_type: u32) -> io::Result<bool> {
    use aya_obj::generated::BPF_F_NO_PREALLOC;
    // SAFETY: `bpf_attr` is a union of plain integers; all-zero is valid.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the map-create member of a zeroed union.
    let create = unsafe { &mut attr.__bindgen_anon_1 };
    create.map_type = map_type;
    create.key_size = 4;
    create.value_size = u32::MAX;
    create.max_entries = 0;
    create.map_flags = BPF_F_NO_PREALLOC;
    create.btf_key_type_id = 1;
    create.btf_value_type_id = 1;
    match bpf_fd(bpf_cmd::BPF_MAP_CREATE, &mut attr) {
        // Not expected (the value size is impossible), but a map means support.
        Ok(_map) => Ok(true),
        Err(err) => match err.raw_os_error() {
            Some(libc::E2BIG) => Ok(true),
            Some(libc::EINVAL) => Ok(false),
            _ => Err(err),
        },
    }
}

/// How a helper answer was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelperProbe {
    /// A probe program of the asked type.
    Direct,
    /// A raw_tracepoint probe stands in for tracing and lsm, whose programs need a
    /// BTF attach target to load. Both can call every raw_tracepoint helper; their
    /// own extras (e.g. `bpf_get_func_ip`, `bpf_d_path`) may read as false.
    RawTracepointProxy,
}

/// Whether `helper` (with `bpf_` prefix) may be called from `program_type`
/// programs on the running kernel.
pub fn probe_helper(program_type: &str, helper: &str) -> Result<(bool, HelperProbe), ProbeError> {
    let (pt, how) = match program_type {
        "tracing" | "lsm" => (ProgramType::RawTracePoint, HelperProbe::RawTracepointProxy),
        "ext" | "struct_ops" => return Err(ProbeError::NotProbeable(program_type.to_string())),
        other => (
            self::program_type(other)
                .ok_or_else(|| ProbeError::UnknownProgramType(other.to_string()))?,
            HelperProbe::Direct,
        ),
    };
    let id = bpf_helper(helper).ok_or_else(|| ProbeError::UnknownHelper(helper.to_string()))?;
    is_helper_supported(pt, id)
        .map(|ok| (ok, how))
        .map_err(|e| ProbeError::Failed {
            what: format!("{helper} for {program_type}"),
            reason: program_error(&e),
        })
}

fn program_error(e: &ProgramError) -> String {
    match e {
        ProgramError::SyscallError(s) => format!("{}: {}", s.call, s.io_error),
        other => other.to_string(),
    }
}

/// The loader's helper id for a `bpf_`-prefixed helper name.
fn bpf_helper(name: &str) -> Option<BpfHelper> {
    let id = helper_id(name)?;
    if id == 0 || id >= BpfHelper::__BPF_FUNC_MAX_ID as u32 {
        return None;
    }
    // SAFETY: `bpf_func_id` is `#[repr(u32)]` and, like the kernel's enum, numbers
    // its variants densely from 0 to `__BPF_FUNC_MAX_ID`; `id` is in that range.
    // The test `helper_ids_match_the_loader` checks every id against its name.
    Some(unsafe { std::mem::transmute::<u32, BpfHelper>(id) })
}

/// The loader's program type for a bpftool program type name.
pub fn program_type(name: &str) -> Option<ProgramType> {
    Some(match name {
        "socket_filter" => ProgramType::SocketFilter,
        "kprobe" => ProgramType::KProbe,
        "sched_cls" => ProgramType::SchedClassifier,
        "sched_act" => ProgramType::SchedAction,
        "tracepoint" => ProgramType::TracePoint,
        "xdp" => ProgramType::Xdp,
        "perf_event" => ProgramType::PerfEvent,
        "cgroup_skb" => ProgramType::CgroupSkb,
        "cgroup_sock" => ProgramType::CgroupSock,
        "lwt_in" => ProgramType::LwtInput,
        "lwt_out" => ProgramType::LwtOutput,
        "lwt_xmit" => ProgramType::LwtXmit,
        "sock_ops" => ProgramType::SockOps,
        "sk_skb" => ProgramType::SkSkb,
        "cgroup_device" => ProgramType::CgroupDevice,
        "sk_msg" => ProgramType::SkMsg,
        "raw_tracepoint" => ProgramType::RawTracePoint,
        "cgroup_sock_addr" => ProgramType::CgroupSockAddr,
        "lwt_seg6local" => ProgramType::LwtSeg6local,
        "lirc_mode2" => ProgramType::LircMode2,
        "sk_reuseport" => ProgramType::SkReuseport,
        "flow_dissector" => ProgramType::FlowDissector,
        "cgroup_sysctl" => ProgramType::CgroupSysctl,
        "raw_tracepoint_writable" => ProgramType::RawTracePointWritable,
        "cgroup_sockopt" => ProgramType::CgroupSockopt,
        "tracing" => ProgramType::Tracing,
        "struct_ops" => ProgramType::StructOps,
        "ext" => ProgramType::Extension,
        "lsm" => ProgramType::Lsm(LsmAttachType::Mac),
        "sk_lookup" => ProgramType::SkLookup,
        "syscall" => ProgramType::Syscall,
        "netfilter" => ProgramType::Netfilter,
        _ => return None,
    })
}

/// The loader's map type for a bpftool map type name.
pub fn map_type(name: &str) -> Option<MapType> {
    Some(match name {
        "hash" => MapType::Hash,
        "array" => MapType::Array,
        "prog_array" => MapType::ProgramArray,
        "perf_event_array" => MapType::PerfEventArray,
        "percpu_hash" => MapType::PerCpuHash,
        "percpu_array" => MapType::PerCpuArray,
        "stack_trace" => MapType::StackTrace,
        "cgroup_array" => MapType::CgroupArray,
        "lru_hash" => MapType::LruHash,
        "lru_percpu_hash" => MapType::LruPerCpuHash,
        "lpm_trie" => MapType::LpmTrie,
        "array_of_maps" => MapType::ArrayOfMaps,
        "hash_of_maps" => MapType::HashOfMaps,
        "devmap" => MapType::DevMap,
        "sockmap" => MapType::SockMap,
        "cpumap" => MapType::CpuMap,
        "xskmap" => MapType::XskMap,
        "sockhash" => MapType::SockHash,
        "cgroup_storage" => MapType::CgroupStorage,
        "reuseport_sockarray" => MapType::ReuseportSockArray,
        "percpu_cgroup_storage" => MapType::PerCpuCgroupStorage,
        "queue" => MapType::Queue,
        "stack" => MapType::Stack,
        "sk_storage" => MapType::SkStorage,
        "devmap_hash" => MapType::DevMapHash,
        "struct_ops" => MapType::StructOps,
        "ringbuf" => MapType::RingBuf,
        "inode_storage" => MapType::InodeStorage,
        "task_storage" => MapType::TaskStorage,
        "bloom_filter" => MapType::BloomFilter,
        "user_ringbuf" => MapType::UserRingBuf,
        "cgrp_storage" => MapType::CgrpStorage,
        "arena" => MapType::Arena,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
