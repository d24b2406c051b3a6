//! The primitives of loading one candidate variant into the kernel: the object with its
//! config and dispatch globals, the programs that attach, and the failures with their
//! stage and verifier log. `mechanism` puts them together by dispatch mechanism, and
//! `dispatch` loads the handlers. Everything loaded is pinned into the attempt's
//! directory as it goes, so the caller can throw the whole attempt away by removing
//! that directory.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    programs::{Program, ProgramError},
    Btf, Ebpf, EbpfLoader,
};
use bpfpoly_crds::{
    program::{Attach, Dispatch, FallbackPolicy, Variant},
    state::{FallbackRecord, FallbackStage, HandlerState},
};

use crate::kconfig::{self, KernelFacts};

use super::{
    error::chain,
    object::{self, AttachKind, Mechanism, ObjectInfo, DISPATCH_MODE_GLOBAL, HANDLER_MASK_GLOBAL},
    pins,
};

/// `EACCES`: what the verifier returns when it rejects a program.
pub(super) const EACCES: i32 = 13;
/// `EPERM`: refused before verification (e.g. no BPF trampolines for freplace/fentry).
const EPERM: i32 = 1;
/// Bound of the verifier log excerpt kept in status.
pub(super) const VERIFIER_LOG_TAIL: usize = 4096;

/// Why a candidate (or a part of it) did not make it.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    pub stage: FallbackStage,
    pub reason: String,
    pub verifier_log: Option<String>,
}

impl Failure {
    pub(super) fn new(stage: FallbackStage, reason: impl Into<String>) -> Self {
        Self {
            stage,
            reason: reason.into(),
            verifier_log: None,
        }
    }
}

/// What loading needs from the running kernel, read on first need.
pub(super) struct Kernel {
    /// The kernel's BTF, for CO-RE relocations and tp_btf/fentry/fexit targets: parsed
    /// (10-20 ms, 15-20 MiB) the first time an object needs it, and kept, as it does not
    /// change while the kernel runs. Objects that need neither never parse it. A failed
    /// read is not kept: the next object that needs it tries again.
    btf: Option<Btf>,
    /// What `__kconfig` externs are filled from, read on first need.
    facts: KernelFacts,
}

impl Kernel {
    pub(super) fn new() -> Self {
        Self {
            btf: None,
            facts: KernelFacts::running(),
        }
    }

    /// Resolve `__kconfig` externs from `facts` instead of the running kernel.
    pub(super) fn with_facts(mut self, facts: KernelFacts) -> Self {
        self.facts = facts;
        self
    }

    /// Forgets what an apply read that may change (the kernel config file); the BTF stays.
    pub(super) fn end_apply(&mut self) {
        self.facts.forget();
    }

    /// The kernel's BTF, as a load error when it cannot be read.
    pub(super) fn btf_ref(&mut self) -> Result<&Btf, LoadError> {
        self.btf().map_err(LoadError::other)
    }

    fn btf(&mut self) -> Result<&Btf, String> {
        let btf = match self.btf.take() {
            Some(btf) => btf,
            None => Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {}", chain(&e)))?,
        };
        Ok(self.btf.insert(btf))
    }

    /// A fresh loader. It relocates against the kernel's BTF only when the object has
    /// CO-RE relocations (the only use aya makes of a loader's BTF), which it reads on
    /// first need; where it cannot be read, such an object loads unrelocated, as with
    /// `EbpfLoader::new()`.
    fn ebpf_loader(&mut self, core_relocations: bool) -> EbpfLoader<'_> {
        let mut loader = loader_without_btf();
        if core_relocations {
            loader.btf(self.btf().ok());
        }
        loader
    }
}

/// An `EbpfLoader` with no target BTF, without the parse of the kernel's BTF that aya's
/// only constructor does. `EbpfLoader::new()` reads and parses /sys/kernel/btf/vmlinux
/// (10-20 ms and 15-20 MiB, most of an apply), and `.btf(None)` only drops the result
/// afterwards (aya-rs/aya#1172). So the loader is made on a short-lived thread whose own
/// filesystem root (`unshare(CLONE_FS)`, then `chroot` into `/proc/self/fd`, which has no
/// `sys/`) hides that file: the read fails at once and the loader starts with no BTF, as
/// `.btf(None)` would leave it. Nothing else of the process sees that root, and the loader
/// reads no other file. Where the thread cannot change its root (no `CAP_SYS_CHROOT`), the
/// loader is made the slow way, with the same result.
fn loader_without_btf() -> EbpfLoader<'static> {
    without_kernel_btf(EbpfLoader::new).unwrap_or_else(|| {
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        loader
    })
}

/// `f` run on a thread of its own whose filesystem root has no `/sys`, or None when the
/// thread cannot change its root.
fn without_kernel_btf<T: Send + 'static>(f: fn() -> T) -> Option<T> {
    std::thread::Builder::new()
        .name("bpfpoly-loader".into())
        .spawn(move || {
            // SAFETY: both calls take no memory of ours but a NUL-terminated literal;
            // CLONE_FS unshares only this thread's root, cwd and umask, so the chroot that
            // follows is this thread's alone, and the thread ends right after.
            let own_root = unsafe { libc::unshare(libc::CLONE_FS) } == 0
                && unsafe { libc::chroot(c"/proc/self/fd".as_ptr()) } == 0;
            own_root.then(f)
        })
        .ok()?
        .join()
        .ok()
        .flatten()
}

/// A failed program load: aya's error, its errno and the verifier log.
pub(super) struct LoadError {
    pub message: String,
    pub errno: Option<i32>,
    pub log: String,
}

impl LoadError {
    pub(super) fn from_program(e: ProgramError) -> Self {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => Self {
                message: format!("BPF_PROG_LOAD failed: {io_error}"),
                errno: io_error.raw_os_error(),
                log: verifier_log.to_string(),
            },
            other => Self {
                errno: match &other {
                    ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
                    _ => None,
                },
                message: chain(&other),
                log: String::new(),
            },
        }
    }

    pub(super) fn other(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            errno: None,
            log: String::new(),
        }
    }

    /// `what` rejected, with the line of the log that says why.
    pub(super) fn reason(&self, what: &str) -> String {
        match log_summary(&self.log) {
            Some(line) => format!("{what}: {}; verifier: {line}", self.message),
            None if self.log.trim().is_empty() && self.errno == Some(EPERM) => format!(
                "{what}: {} (refused before the verifier ran: missing privileges, or a kernel without BPF trampolines for freplace/fentry/fexit)",
                self.message
            ),
            None if self.log.trim().is_empty() && self.errno.is_some() => {
                format!("{what}: {} (no verifier log)", self.message)
            }
            None => format!("{what}: {}", self.message),
        }
    }

    pub(super) fn failure(&self, stage: FallbackStage, what: &str) -> Failure {
        Failure {
            stage,
            reason: self.reason(what),
            verifier_log: log_tail(&self.log),
        }
    }
}

/// The last `VERIFIER_LOG_TAIL` bytes of a log (on a char boundary), if any.
pub(super) fn log_tail(log: &str) -> Option<String> {
    let log = log.trim();
    if log.is_empty() {
        return None;
    }
    let mut start = log.len().saturating_sub(VERIFIER_LOG_TAIL);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    Some(log[start..].to_owned())
}

/// The line of a verifier log that says why: the last one that is not statistics.
fn log_summary(log: &str) -> Option<&str> {
    const STATS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
}

/// What one candidate needs to load.
pub(super) struct Input<'a> {
    pub variant: &'a Variant,
    pub object: &'a [u8],
    pub info: &'a ObjectInfo,
    /// Resolved config: global name and native-endian value.
    pub config: &'a [(String, Vec<u8>)],
    /// The dispatch table, when this variant dispatches, with the mechanism to use.
    pub dispatch: Option<(&'a Dispatch, Mechanism)>,
    /// `auto`: a failing freplace falls back to tail calls (else it fails the variant).
    pub auto: bool,
    /// freplace handler object, when the variant has one (already fetched and inspected).
    pub handler_object: Option<Result<(&'a [u8], &'a ObjectInfo), String>>,
    pub policy: &'a FallbackPolicy,
    /// The attempt's pin directory (exists, empty).
    pub dir: &'a Path,
}

/// A loaded candidate, pinned, not yet attached.
pub(super) struct Loaded {
    /// The object whose programs attach.
    pub ebpf: Ebpf,
    /// Objects that must stay open until their links are pinned (freplace handlers).
    pub extra: Vec<Ebpf>,
    pub mechanism: Option<Mechanism>,
    pub handlers: Vec<HandlerState>,
    /// Degradations inside the variant (mechanism, handlers).
    pub fallbacks: Vec<FallbackRecord>,
    /// Kernel ids of the programs that run, by name (entry, attached, handlers).
    pub program_ids: BTreeMap<String, u32>,
    /// Dispatch keys, for the counters.
    pub dispatch_keys: Vec<u32>,
    /// freplace links pinned in the directory.
    pub extension_links: Vec<pins::LinkRecord>,
}

/// Values of `bpfpoly_dispatch_mode` and `bpfpoly_handler_mask` to write.
#[derive(Clone, Copy)]
pub(super) struct DispatchGlobals {
    pub mode: Option<u32>,
    pub mask: Option<u64>,
}

/// Parses the object, creates its maps and writes config and dispatch globals.
pub(super) fn open_object(
    kernel: &mut Kernel,
    (bytes, info): (&[u8], &ObjectInfo),
    config: &[(String, Vec<u8>)],
    DispatchGlobals { mode, mask }: DispatchGlobals,
    map_pins: &[(String, PathBuf)],
    extensions: &[String],
) -> Result<Ebpf, Failure> {
    let has = |name: &str| info.globals.contains_key(name);
    let aligned = object::Aligned::new(bytes);
    let resolved = kconfig::resolve_object(aligned.bytes(), &kernel.facts).map_err(|problems| {
        Failure::new(
            FallbackStage::Verify,
            format!("resolving __kconfig externs: {}", problems.join("; ")),
        )
    })?;
    let resolved_aligned = resolved.as_deref().map(object::Aligned::new);
    let bytes = resolved_aligned
        .as_ref()
        .map_or_else(|| aligned.bytes(), |a| a.bytes());
    let mut loader = kernel.ebpf_loader(info.core_relocations);
    for (name, value) in config {
        if has(name) {
            loader.override_global(name.as_str(), value.as_slice(), true);
        }
    }
    if let Some(mode) = mode.as_ref().filter(|_| has(DISPATCH_MODE_GLOBAL)) {
        loader.override_global(DISPATCH_MODE_GLOBAL, mode, true);
    }
    if let Some(mask) = mask.as_ref() {
        loader.override_global(HANDLER_MASK_GLOBAL, mask, true);
    }
    for (name, path) in map_pins {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    for name in extensions {
        loader.extension(name.as_str());
    }
    loader.load(bytes).map_err(|e| {
        let (message, log) = match &e {
            aya::EbpfError::BtfError(aya::BtfError::LoadError {
                io_error,
                verifier_log,
            }) => (
                format!("loading the object's BTF failed: {io_error}"),
                verifier_log.to_string(),
            ),
            other => (
                format!("loading the object failed: {}", chain(other)),
                String::new(),
            ),
        };
        Failure {
            stage: FallbackStage::Verify,
            reason: message,
            verifier_log: log_tail(&log),
        }
    })
}

/// Loads `name` with the attach parameters its kind needs; returns its kernel id.
pub(super) fn load_program(
    ebpf: &mut Ebpf,
    name: &str,
    attach: Option<&Attach>,
    kernel: &mut Kernel,
) -> Result<u32, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::other(format!("program {name:?} not in the object")))?;
    // The BTF-typed kinds load against their target in the kernel's BTF.
    let target = |kind: AttachKind| {
        attach.and_then(|a| kind.btf_target(a)).ok_or_else(|| {
            LoadError::other(format!("program {name:?} needs attach.{}", kind.field()))
        })
    };
    let result = match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::KProbe(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::BtfTracePoint(p) => p.load(target(AttachKind::TpBtf)?, kernel.btf_ref()?),
        Program::FEntry(p) => p.load(target(AttachKind::FEntry)?, kernel.btf_ref()?),
        Program::FExit(p) => p.load(target(AttachKind::FExit)?, kernel.btf_ref()?),
        other => {
            return Err(LoadError::other(format!(
                "program {name:?} has a program type the agent does not load ({:?})",
                other.prog_type()
            )))
        }
    };
    result.map_err(LoadError::from_program)?;
    program_id(program)
}

fn program_id(program: &Program) -> Result<u32, LoadError> {
    program
        .info()
        .map(|i| i.id())
        .map_err(|e| LoadError::other(format!("reading the program id: {}", chain(&e))))
}

/// Opens the object and loads the programs that attach. Any rejection rejects the variant.
pub(super) fn load_attached(
    input: &Input<'_>,
    mode: Option<u32>,
    mask: Option<u64>,
    map_pins: &[(String, PathBuf)],
    kernel: &mut Kernel,
) -> Result<Loaded, Failure> {
    let mut ebpf = open_object(
        kernel,
        (input.object, input.info),
        input.config,
        DispatchGlobals { mode, mask },
        map_pins,
        &[],
    )?;
    let mut program_ids = BTreeMap::new();
    for program in &input.variant.programs {
        let Some(attach) = program.attach.as_ref() else {
            continue;
        };
        let id = load_program(&mut ebpf, &program.name, Some(attach), kernel).map_err(|e| {
            e.failure(
                FallbackStage::Verify,
                &format!("program {:?}", program.name),
            )
        })?;
        program_ids.insert(program.name.clone(), id);
    }
    Ok(Loaded {
        ebpf,
        extra: Vec::new(),
        mechanism: None,
        handlers: Vec::new(),
        fallbacks: Vec::new(),
        program_ids,
        dispatch_keys: Vec::new(),
        extension_links: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::without_kernel_btf;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    /// The loader's own thread does not see the kernel's BTF (so aya's constructor skips
    /// its parse), and the rest of the process still does. Needs root (CAP_SYS_CHROOT).
    #[test]
    fn the_loader_thread_alone_has_no_kernel_btf() {
        if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!("skipped: BPFPOLY_SKIP_PRIVILEGED=1 (chroot needs CAP_SYS_CHROOT)");
            return;
        }
        assert!(
            std::path::Path::new(VMLINUX).exists(),
            "{VMLINUX} missing: this kernel has no BTF"
        );
        let seen = without_kernel_btf(|| std::path::Path::new(VMLINUX).exists());
        assert_eq!(
            seen,
            Some(false),
            "the loader thread could not change its root (run as root) or still sees {VMLINUX}"
        );
        assert!(
            std::path::Path::new(VMLINUX).exists(),
            "the process lost {VMLINUX}"
        );
        assert!(std::path::Path::new("/proc/self/status").exists());
    }
}
