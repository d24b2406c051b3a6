//! Building C eBPF objects the way an outsider would (clang, libbpf's headers, nothing of
//! bpfpoly's), for the tests that compare bpfpoly's loader with libbpf's. Included with
//! `#[path]` by `node-agent/tests/kconfig_kernel.rs` and `verify_parity.rs`.

use std::path::Path;
use std::process::Command;

/// Builds C as an outsider would: clang, libbpf's headers, nothing of bpfpoly's.
pub fn build(source: &Path, out: &Path) {
    let multiarch = Command::new("clang")
        .arg("-print-multiarch")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let out_ = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(source)
        .arg("-o")
        .arg(out)
        .args(["-idirafter", &format!("/usr/include/{multiarch}")])
        .output()
        .expect("clang (apt-get install clang libbpf-dev)");
    assert!(
        out_.status.success(),
        "clang {}: {}",
        source.display(),
        String::from_utf8_lossy(&out_.stderr)
    );
}
