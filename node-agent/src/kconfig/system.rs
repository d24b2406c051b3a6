//! The running kernel's answers to `__kconfig` externs: its release, its build
//! config, and two BPF features. Each is read on first need only.

use std::{
    cell::OnceCell,
    collections::BTreeMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
};

/// A kernel build config: `CONFIG_*` names with their raw values, and where from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// `CONFIG_HZ` → `250`, `CONFIG_BPF` → `y`, `CONFIG_LOCALVERSION` → `""`.
    pub values: BTreeMap<String, String>,
    /// The file it was read from.
    pub source: String,
}

/// Parses a kernel config (`.config` syntax). As in libbpf, only `CONFIG_X=value` lines
/// count: `# CONFIG_X is not set` is the same as absent.
pub fn parse_config(text: &str, source: &str) -> KernelConfig {
    let values = text
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    KernelConfig {
        values,
        source: source.to_owned(),
    }
}

/// Reads a config file, gzip-compressed (`/proc/config.gz`) or not.
pub fn read_config(path: &Path) -> Result<KernelConfig, String> {
    let raw = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = String::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(64 << 20)
            .read_to_string(&mut out)
            .map_err(|e| format!("{}: gzip: {e}", path.display()))?;
        out
    } else {
        String::from_utf8(raw).map_err(|_| format!("{}: not text", path.display()))?
    };
    Ok(parse_config(&text, &path.display().to_string()))
}

/// `KERNEL_VERSION(a, b, c)` of a release such as `6.1.0-18-amd64` (c capped at 255,
/// as the kernel's macro does); 0 when the release does not start with `a.b.c`.
pub fn kernel_version(release: &str) -> u32 {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)))
            if release.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            (a.min(255) << 16) | (b.min(255) << 8) | c.min(255)
        }
        _ => 0,
    }
}

/// What the externs are resolved from: the running kernel unless told otherwise.
#[derive(Debug, Default)]
pub struct KernelFacts {
    release: Option<String>,
    config_path: Option<PathBuf>,
    config: OnceCell<Result<KernelConfig, String>>,
    bpf_cookie: OnceCell<Result<bool, String>>,
    syscall_wrapper: OnceCell<Result<bool, String>>,
    /// Answers given, not read: never forgotten.
    fixed: bool,
}

impl KernelFacts {
    /// The running kernel (`uname -r`, its config file, its BTF and symbols).
    pub fn running() -> Self {
        Self::default()
    }

    /// Another release for `LINUX_KERNEL_VERSION` and the config file name.
    pub fn with_release(mut self, release: Option<String>) -> Self {
        self.release = release;
        self
    }

    /// A config file to read instead of the running kernel's.
    pub fn with_config_file(mut self, path: Option<PathBuf>) -> Self {
        self.config_path = path;
        self
    }

    /// Fixed answers, for tests and offline use.
    pub fn fixed(release: &str, config: KernelConfig, bpf_cookie: bool, wrapper: bool) -> Self {
        let facts = Self {
            release: Some(release.to_owned()),
            fixed: true,
            ..Self::default()
        };
        let _ = facts.config.set(Ok(config));
        let _ = facts.bpf_cookie.set(Ok(bpf_cookie));
        let _ = facts.syscall_wrapper.set(Ok(wrapper));
        facts
    }

    /// Forgets what was read from the system (the config: hundreds of KiB), keeping
    /// what was given.
    pub fn forget(&mut self) {
        if !self.fixed {
            self.config = OnceCell::new();
        }
    }

    /// The release (`uname -r` unless given).
    pub fn release(&self) -> String {
        self.release.clone().unwrap_or_else(uname_release)
    }

    /// `LINUX_KERNEL_VERSION`.
    pub fn kernel_version(&self) -> u32 {
        kernel_version(&self.release())
    }

    /// The kernel config: the given file, else `/boot/config-<release>` then
    /// `/proc/config.gz` (libbpf's order).
    pub fn config(&self) -> Result<&KernelConfig, String> {
        self.config
            .get_or_init(|| {
                if let Some(path) = &self.config_path {
                    return read_config(path);
                }
                let boot = PathBuf::from(format!("/boot/config-{}", self.release()));
                let proc = Path::new("/proc/config.gz");
                if boot.exists() {
                    read_config(&boot)
                } else if proc.exists() {
                    read_config(proc)
                } else {
                    Err(format!(
                        "neither {} nor {} exists",
                        boot.display(),
                        proc.display()
                    ))
                }
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `LINUX_HAS_BPF_COOKIE`: the kernel has the `bpf_get_attach_cookie` helper
    /// (its BTF names `BPF_FUNC_get_attach_cookie`).
    pub fn has_bpf_cookie(&self) -> Result<bool, String> {
        self.bpf_cookie
            .get_or_init(|| {
                // A BTF string exists only as the name of something: here, the
                // enumerator of `enum bpf_func_id`.
                let path = "/sys/kernel/btf/vmlinux";
                let btf = fs::read(path).map_err(|e| format!("{path}: {e}"))?;
                let name = b"\0BPF_FUNC_get_attach_cookie\0";
                Ok(btf.windows(name.len()).any(|w| w == name))
            })
            .clone()
    }

    /// `LINUX_HAS_SYSCALL_WRAPPER`: system calls enter through arch-prefixed wrappers
    /// (`__x64_sys_bpf` in `/proc/kallsyms`). libbpf finds this out by creating a
    /// kprobe on the wrapper, so it answers 0 on a kernel without kprobes; here the
    /// symbol itself is the answer.
    pub fn has_syscall_wrapper(&self) -> Result<bool, String> {
        self.syscall_wrapper
            .get_or_init(|| {
                let Some(prefix) = syscall_prefix() else {
                    return Ok(false);
                };
                let wanted = format!("__{prefix}_sys_bpf");
                let text = fs::read_to_string("/proc/kallsyms")
                    .map_err(|e| format!("/proc/kallsyms: {e}"))?;
                Ok(text
                    .lines()
                    .any(|l| l.split_whitespace().nth(2) == Some(wanted.as_str())))
            })
            .clone()
    }
}

fn syscall_prefix() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("x64"),
        "x86" => Some("ia32"),
        "aarch64" => Some("arm64"),
        "s390x" => Some("s390x"),
        "powerpc64" => Some("powerpc"),
        "riscv64" => Some("riscv"),
        _ => None,
    }
}

fn uname_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
