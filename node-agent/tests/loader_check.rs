//! What the loader decides without the kernel: the object check against the custom
//! resource (programs, sections, config globals and their BTF types, dispatch
//! pieces) on the built-in objects, and fetching bytecode from the node's disk.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use bpfpoly_agent::{
    builtin,
    fetch::{check_sha256, fetch_path, sha256_hex, FetchError},
    loader::{
        assignment_digest,
        object::check::{check_handler_object, check_variant, resolve_auto},
        object::{inspect, Mechanism, ObjectInfo, ProgramKind, Scalar},
    },
};
use bpfpoly_crds::{
    program::{Dispatch, Variant},
    state::{ProgramAssignment, ResolvedConfig},
};
use serde_json::json;

fn object(name: &str) -> ObjectInfo {
    inspect(builtin::builtin(name).unwrap()).unwrap()
}

fn classifier_variant(object: &str, attach: serde_json::Value) -> Variant {
    serde_json::from_value(json!({
        "name": "v",
        "bytecode": {"builtin": object},
        "programs": [
            {"name": "classify", "attach": attach},
            {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}
        ]
    }))
    .unwrap()
}

fn xdp() -> serde_json::Value {
    json!({"xdp": {"interfaces": ["eth0"]}})
}

fn dispatch() -> Dispatch {
    serde_json::from_value(json!({
        "entry": "classify",
        "slots": [
            {"key": 6, "handler": "handle_tcp"},
            {"key": 17, "handler": "handle_udp"},
            {"key": 1, "handler": "handle_icmp"}
        ]
    }))
    .unwrap()
}

fn config(fields: &[(&str, &str, &str)]) -> Vec<ResolvedConfig> {
    fields
        .iter()
        .map(|(name, ty, value)| {
            serde_json::from_value(json!({"name": name, "type": ty, "value": value})).unwrap()
        })
        .collect()
}

fn problems(
    info: &ObjectInfo,
    variant: &Variant,
    cfg: &[ResolvedConfig],
    d: Option<(&Dispatch, Mechanism)>,
) -> String {
    check_variant(info, variant, cfg, d).unwrap_err().join("\n")
}

/// Which objects need the kernel's BTF to load: only those with CO-RE relocations make
/// the loader read and parse it (10-20 ms); the packet classifier loads without it.
#[test]
fn core_relocations_say_which_objects_need_the_kernel_btf() {
    for name in [
        "exec-tracer-tpbtf",
        "exec-tracer-tracepoint",
        "exec-tracer-kprobe",
    ] {
        assert!(object(name).core_relocations, "{name}");
    }
    for name in [
        "packet-classifier-xdp",
        "packet-classifier-tc",
        "comm-stats-bounded",
    ] {
        assert!(!object(name).core_relocations, "{name}");
    }
}

#[test]
fn the_classifier_object_is_read_as_the_abi_says() {
    let info = object("packet-classifier-xdp");
    for p in ["classify", "handle_tcp", "handle_udp", "handle_icmp"] {
        assert_eq!(info.programs[p], ProgramKind::Xdp, "{p}");
    }
    assert_eq!(info.maps["jump_table"], "prog_array");
    assert_eq!(info.maps["bpfpoly_dispatch"], "percpu_array");
    assert_eq!(info.globals["count_bytes"].scalar, Scalar::Bool);
    assert_eq!(info.globals["count_bytes"].size, 1);
    assert_eq!(
        info.globals["bpfpoly_dispatch_mode"].scalar,
        Scalar::Int {
            bytes: 4,
            signed: false
        }
    );
    assert_eq!(
        info.globals["bpfpoly_handler_mask"].scalar,
        Scalar::Int {
            bytes: 8,
            signed: false
        }
    );
    for slot in ["bpfpoly_slot_1", "bpfpoly_slot_6", "bpfpoly_slot_17"] {
        assert!(info.functions.contains(slot), "{slot}");
    }
    assert_eq!(
        object("packet-classifier-tc").programs["classify"],
        ProgramKind::Classifier
    );
    assert_eq!(
        object("exec-tracer-tpbtf").programs["on_exec"],
        ProgramKind::TpBtf
    );
    assert_eq!(
        object("exec-tracer-kprobe").programs["on_exec"],
        ProgramKind::KProbe
    );
    assert_eq!(
        object("exec-tracer-tracepoint").programs["on_exec"],
        ProgramKind::TracePoint
    );
    let freplace = object("packet-classifier-freplace");
    assert_eq!(freplace.programs["handle_tcp"], ProgramKind::Extension);
    assert!(check_handler_object(&freplace, &dispatch()).is_ok());
    assert!(check_handler_object(&info, &dispatch())
        .unwrap_err()
        .join(" ")
        .contains("not freplace/bpfpoly_slot_6"));
}

#[test]
fn a_matching_variant_passes_the_check_for_every_mechanism() {
    let info = object("packet-classifier-xdp");
    let v = classifier_variant("packet-classifier-xdp", xdp());
    let cfg = config(&[
        ("count_bytes", "bool", "true"),
        ("vlan_aware", "bool", "false"),
    ]);
    let d = dispatch();
    for m in [Mechanism::TailCall, Mechanism::Static, Mechanism::Freplace] {
        assert_eq!(
            check_variant(&info, &v, &cfg, Some((&d, m))),
            Ok(()),
            "{m:?}"
        );
    }
    assert_eq!(resolve_auto(&info, &d, false), Mechanism::TailCall);
    assert_eq!(resolve_auto(&info, &d, true), Mechanism::Freplace);
}

#[test]
fn config_globals_are_checked_by_name_size_and_type() {
    let info = object("packet-classifier-xdp");
    let v = classifier_variant("packet-classifier-xdp", xdp());
    let missing = problems(&info, &v, &config(&[("use_ringbuf", "bool", "true")]), None);
    assert!(
        missing.contains("config global \"use_ringbuf\" not found")
            && missing.contains("count_bytes"),
        "{missing}"
    );
    for (ty, expected) in [
        (
            "u8",
            "is declared u8 (__u8, 1 byte) but the object has bool",
        ),
        (
            "u32",
            "is declared u32 (__u32, 4 bytes) but the object has bool",
        ),
        ("i64", "is declared i64"),
    ] {
        let wrong = problems(&info, &v, &config(&[("count_bytes", ty, "1")]), None);
        assert!(wrong.contains(expected), "{ty}: {wrong}");
    }
    // The dispatch mask is a u64: declaring it u32 would write half of it.
    let mask = problems(
        &info,
        &v,
        &config(&[("bpfpoly_handler_mask", "u32", "1")]),
        None,
    );
    assert!(mask.contains("declared u32"), "{mask}");
    assert!(check_variant(
        &info,
        &v,
        &config(&[("bpfpoly_handler_mask", "u64", "1")]),
        None
    )
    .is_ok());
}

#[test]
fn programs_must_exist_and_fit_their_attachment() {
    let info = object("packet-classifier-xdp");
    let mut v = classifier_variant("packet-classifier-xdp", xdp());
    v.programs
        .push(serde_json::from_value(json!({"name": "clasify"})).unwrap());
    let p = problems(&info, &v, &[], None);
    assert!(
        p.contains("program \"clasify\" not found in the object (it has: classify, handle_icmp"),
        "{p}"
    );
    let tc = classifier_variant(
        "packet-classifier-xdp",
        json!({"tc": {"interfaces": ["eth0"]}}),
    );
    let p = problems(&info, &tc, &[], None);
    assert!(p.contains("program \"classify\" attaches as tc and needs a classifier section, but the object has it in a xdp section"), "{p}");
    let tracer = object("exec-tracer-tpbtf");
    let v: Variant = serde_json::from_value(json!({
        "name": "v", "bytecode": {"builtin": "exec-tracer-tpbtf"},
        "programs": [{"name": "on_exec", "attach": {"kprobe": {"function": "finalize_exec"}}}]
    }))
    .unwrap();
    let p = problems(&tracer, &v, &[], None);
    assert!(
        p.contains("needs a kprobe section") && p.contains("tp_btf section"),
        "{p}"
    );
}

#[test]
fn dispatch_needs_its_table_and_same_type_handlers() {
    let info = object("packet-classifier-xdp");
    let v = classifier_variant("packet-classifier-xdp", xdp());
    let mut d = dispatch();
    d.table = "no_table".into();
    let p = problems(&info, &v, &[], Some((&d, Mechanism::TailCall)));
    assert!(
        p.contains("dispatch table \"no_table\" (PROG_ARRAY) not found"),
        "{p}"
    );
    d.table = "bpfpoly_dispatch".into();
    let p = problems(&info, &v, &[], Some((&d, Mechanism::TailCall)));
    assert!(p.contains("is a percpu_array map, not a prog_array"), "{p}");
    // The tracer has no dispatch ABI at all.
    let tracer = object("exec-tracer-tpbtf");
    let tv: Variant = serde_json::from_value(json!({
        "name": "v", "bytecode": {"builtin": "exec-tracer-tpbtf"},
        "programs": [{"name": "on_exec", "attach": {"tpBtf": {"name": "sched_process_exec"}}}]
    }))
    .unwrap();
    let mut td = dispatch();
    td.entry = "on_exec".into();
    td.slots.clear();
    let p = problems(&tracer, &tv, &[], Some((&td, Mechanism::Static)));
    assert!(
        p.contains("static dispatch needs the global \"bpfpoly_dispatch_mode\""),
        "{p}"
    );
    let p = problems(&tracer, &tv, &[], Some((&td, Mechanism::Freplace)));
    assert!(p.contains("freplace dispatch needs"), "{p}");
}

#[test]
fn hostile_objects_are_errors_not_panics() {
    let classifier = builtin::builtin("packet-classifier-xdp").unwrap();
    let true_bytes = fs::read("/bin/true").unwrap();
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"hello".to_vec(),
        b"\x7fELF".to_vec(),
        classifier[..64].to_vec(),
        classifier[..classifier.len() / 2].to_vec(),
        true_bytes,
    ];
    // Every byte of the header area flipped, and truncations at many lengths.
    for i in (0..classifier.len().min(512)).step_by(7) {
        let mut b = classifier.to_vec();
        b[i] ^= 0xff;
        inputs.push(b);
    }
    for len in (0..classifier.len()).step_by(classifier.len() / 50 + 1) {
        inputs.push(classifier[..len].to_vec());
    }
    // Misaligned input is copied, not refused.
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(classifier);
    assert!(inspect(&shifted[1..]).is_ok());
    for input in &inputs {
        let _ = inspect(input); // must return
    }
    assert!(inspect(&[]).unwrap_err().to_string().contains("empty"));
    assert!(inspect(&fs::read("/bin/true").unwrap())
        .unwrap_err()
        .to_string()
        .contains("not an eBPF object"));
}

#[test]
fn the_digest_ignores_the_generation_only() {
    let a: ProgramAssignment = serde_json::from_value(json!({
        "name": "p", "generation": 1,
        "candidates": [{"name": "v", "bytecode": {"builtin": "x"}, "programs": [{"name": "f"}]}],
        "config": [{"name": "c", "type": "bool", "value": "true"}]
    }))
    .unwrap();
    let mut b = a.clone();
    b.generation = 7;
    assert_eq!(assignment_digest(&a), assignment_digest(&b));
    assert_eq!(assignment_digest(&a).len(), 16);
    b.config[0].value = "false".into();
    assert_ne!(assignment_digest(&a), assignment_digest(&b));
}

// ---------------------------------------------------------------------------
// fetch
// ---------------------------------------------------------------------------

struct TempDirs {
    allowed: PathBuf,
    outside: PathBuf,
}

impl TempDirs {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "bpfpoly-fetch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (allowed, outside) = (base.join("allowed"), base.join("outside"));
        fs::create_dir_all(&allowed).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Self { allowed, outside }
    }

    fn allowed_dirs(&self) -> Vec<PathBuf> {
        vec![self.allowed.clone()]
    }
}

impl Drop for TempDirs {
    fn drop(&mut self) {
        if let Some(base) = self.allowed.parent() {
            let _ = fs::remove_dir_all(base);
        }
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn a_file_under_an_allowed_dir_with_its_sha256_is_read() {
    let t = TempDirs::new();
    let file = t.allowed.join("prog.o");
    fs::write(&file, b"object bytes").unwrap();
    let sha = sha256_hex(b"object bytes");
    let got = fetch_path(&path_str(&file), Some(&sha), &t.allowed_dirs(), 1 << 20).unwrap();
    assert_eq!(got, b"object bytes");
    // A symlink that stays inside the allowed directory is fine.
    std::os::unix::fs::symlink(&file, t.allowed.join("link.o")).unwrap();
    assert!(fetch_path(
        &path_str(&t.allowed.join("link.o")),
        Some(&sha),
        &t.allowed_dirs(),
        1 << 20
    )
    .is_ok());
}

#[test]
fn paths_that_leave_the_allowed_dirs_are_refused() {
    let t = TempDirs::new();
    let secret = t.outside.join("secret.o");
    fs::write(&secret, b"x").unwrap();
    let sha = sha256_hex(b"x");
    let dirs = t.allowed_dirs();
    let fetch = |p: &str| fetch_path(p, Some(&sha), &dirs, 1 << 20).unwrap_err();

    assert!(matches!(
        fetch(&path_str(&secret)),
        FetchError::OutsideAllowedDirs { .. }
    ));
    std::os::unix::fs::symlink(&secret, t.allowed.join("escape.o")).unwrap();
    let e = fetch(&path_str(&t.allowed.join("escape.o")));
    assert!(matches!(e, FetchError::OutsideAllowedDirs { .. }), "{e}");
    assert!(e.to_string().contains("secret.o"), "{e}");
    // A symlinked directory escaping too.
    std::os::unix::fs::symlink(&t.outside, t.allowed.join("sub")).unwrap();
    assert!(matches!(
        fetch(&path_str(&t.allowed.join("sub/secret.o"))),
        FetchError::OutsideAllowedDirs { .. }
    ));
    let dotdot = format!("{}/../outside/secret.o", t.allowed.display());
    assert!(matches!(fetch(&dotdot), FetchError::ParentComponent { .. }));
    assert!(matches!(
        fetch("relative/prog.o"),
        FetchError::NotAbsolute { .. }
    ));
    assert!(matches!(
        fetch_path(&path_str(&secret), Some(&sha), &[], 1 << 20).unwrap_err(),
        FetchError::NoAllowedDirs { .. }
    ));
}

#[test]
fn size_is_limited_before_reading_and_sha256_is_required_and_checked() {
    let t = TempDirs::new();
    let dirs = t.allowed_dirs();
    let huge = t.allowed.join("huge.o");
    // Sparse: 64 GiB reported, nothing to read. Refused from its size alone.
    fs::File::create(&huge).unwrap().set_len(64 << 30).unwrap();
    let start = Instant::now();
    let e = fetch_path(&path_str(&huge), Some(&sha256_hex(b"")), &dirs, 1 << 20).unwrap_err();
    assert!(
        matches!(e, FetchError::TooLarge { size, .. } if size == 64 << 30),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));

    let file = t.allowed.join("prog.o");
    fs::write(&file, b"abc").unwrap();
    assert!(matches!(
        fetch_path(&path_str(&file), None, &dirs, 1 << 20).unwrap_err(),
        FetchError::MissingSha256 { .. }
    ));
    assert!(matches!(
        fetch_path(&path_str(&file), Some("xyz"), &dirs, 1 << 20).unwrap_err(),
        FetchError::BadSha256 { .. }
    ));
    let e = fetch_path(&path_str(&file), Some(&sha256_hex(b"abd")), &dirs, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("sha256 mismatch"), "{e}");
    assert!(check_sha256(b"abc", Some(&sha256_hex(b"abc"))).is_ok());
}

#[test]
fn directories_fifos_and_missing_files_are_errors_without_blocking() {
    let t = TempDirs::new();
    let dirs = t.allowed_dirs();
    let sha = sha256_hex(b"");
    let sub = t.allowed.join("dir.o");
    fs::create_dir(&sub).unwrap();
    assert!(matches!(
        fetch_path(&path_str(&sub), Some(&sha), &dirs, 1 << 20).unwrap_err(),
        FetchError::NotAFile { .. }
    ));
    let fifo = t.allowed.join("fifo.o");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    assert!(matches!(
        fetch_path(&path_str(&fifo), Some(&sha), &dirs, 1 << 20).unwrap_err(),
        FetchError::NotAFile { .. }
    ));
    assert!(start.elapsed() < Duration::from_secs(1));
    let e = fetch_path(
        &path_str(&t.allowed.join("missing.o")),
        Some(&sha),
        &dirs,
        1 << 20,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::Io { .. }), "{e}");
}

/// Found by the loader fuzz target: a relocation in code that points at a local label
/// (`LBB6_83`) made aya-obj 0.3 panic (`todo!`) at load. The check refuses it first. The
/// fixture is packet-classifier-xdp.o with that one relocation's symbol changed.
#[test]
fn a_code_relocation_to_a_label_is_refused_before_aya_sees_it() {
    let bytes = fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reloc-to-code-label.o"),
    )
    .unwrap();
    let err =
        bpfpoly_agent::inspect::inspect_bytes(&bytes).expect_err("the object must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("xdp: the relocation at 0x158 refers to code symbol LBB6_83")
            && msg.contains("neither a function nor a section"),
        "{msg}"
    );
    // The object it was made from passes.
    let original =
        builtin::builtin("packet-classifier-xdp").expect("built-in packet-classifier-xdp");
    bpfpoly_agent::inspect::inspect_bytes(original).unwrap();
}
