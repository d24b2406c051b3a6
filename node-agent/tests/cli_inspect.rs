#![allow(clippy::unwrap_used)]
//! `bpfpoly-agent inspect`: a libbpf-style object compiled here, Debian's libxdp
//! objects (another toolchain), and hostile files.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bpfpoly-agent");

/// A libbpf-style program with no header dependencies: `SEC()` names, a
/// BTF-defined map, `volatile const` config globals, `.data` and `.bss`.
const PROGRAM_C: &str = r#"
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef _Bool bool;
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
struct xdp_md { __u32 data; __u32 data_end; __u32 data_meta; __u32 ingress_ifindex;
                __u32 rx_queue_index; __u32 egress_ifindex; };
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;

struct {
    __uint(type, 2 /* BPF_MAP_TYPE_ARRAY */);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

volatile const bool count_bytes = 1;
volatile const __u32 sample_rate = 7;
volatile const __s64 offset_ns = -1;
__u64 packets_seen = 0;
char tag[16] = "hello";

SEC("xdp")
int xdp_count(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *v = bpf_map_lookup_elem(&counters, &key);
    if (v && count_bytes)
        __sync_fetch_and_add(v, ctx->data_end - ctx->data + sample_rate + offset_ns);
    packets_seen++;
    return tag[0] ? 2 : 1;
}

char LICENSE[] SEC("license") = "GPL";
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_inspect");
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The test program, compiled once per test run.
fn program_o() -> &'static Path {
    static OBJ: OnceLock<PathBuf> = OnceLock::new();
    OBJ.get_or_init(|| {
        let src = scratch("prog.c");
        let obj = scratch("prog.o");
        fs::write(&src, PROGRAM_C).unwrap();
        let out = Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .expect("clang is needed to build the test object: run `make deps`");
        assert!(
            out.status.success(),
            "clang failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        obj
    })
}

fn inspect(path: &Path) -> Output {
    Command::new(BIN).arg("inspect").arg(path).output().unwrap()
}

fn inspect_json(path: &Path) -> Value {
    let out = inspect(path);
    assert!(
        out.status.success(),
        "inspect {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

#[test]
fn lists_programs_maps_and_typed_globals() {
    let info = inspect_json(program_o());

    let programs = info["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 1);
    let p = &programs[0];
    assert_eq!(p["name"], "xdp_count");
    assert_eq!(p["section"], "xdp");
    assert_eq!(p["type"], "xdp");

    let m = find(&info["maps"], "counters");
    assert_eq!(m["section"], ".maps");
    assert_eq!(m["definition"], "btf");
    assert_eq!(m["type"], "array");
    assert_eq!(m["keySize"], 4);
    assert_eq!(m["valueSize"], 8);
    assert_eq!(m["maxEntries"], 4);
    let rodata = find(&info["maps"], ".rodata");
    assert_eq!(rodata["definition"], "data");
    assert_eq!(rodata["valueSize"], 16);

    let g = &info["globals"];
    let expect = [
        (
            "count_bytes",
            ".rodata",
            "bool",
            "const volatile bool",
            1,
            0,
        ),
        (
            "sample_rate",
            ".rodata",
            "u32",
            "const volatile __u32",
            4,
            4,
        ),
        ("offset_ns", ".rodata", "i64", "const volatile __s64", 8, 8),
        ("packets_seen", ".bss", "u64", "__u64", 8, 0),
        ("tag", ".data", "i8[16]", "char[16]", 16, 0),
    ];
    for (name, section, ty, declared, size, offset) in expect {
        let v = find(g, name);
        assert_eq!(v["section"], section, "{name}");
        assert_eq!(v["type"], ty, "{name}");
        assert_eq!(v["declared"], declared, "{name}");
        assert_eq!(v["size"], size, "{name}");
        assert_eq!(v["offset"], offset, "{name}");
    }
    assert_eq!(g.as_array().unwrap().len(), expect.len(), "{g}");

    assert_eq!(info["license"], "GPL");
    assert_eq!(info["btf"], true);
    let bytes = fs::read(program_o()).unwrap();
    assert_eq!(info["size"], bytes.len());
    let sum = Command::new("sha256sum").arg(program_o()).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(info["sha256"], sum.split_whitespace().next().unwrap());
}

fn libxdp_objects() -> Vec<PathBuf> {
    let out = Command::new("dpkg").args(["-L", "libxdp1"]).output();
    let listing = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => panic!("libxdp1 is not installed: run `make deps` (apt-get install -y libxdp1)"),
    };
    let objects: Vec<PathBuf> = listing
        .lines()
        .filter(|l| l.ends_with(".o"))
        .map(PathBuf::from)
        .collect();
    assert!(!objects.is_empty(), "libxdp1 ships no .o files?");
    objects
}

#[test]
fn every_libxdp_object_is_inspected() {
    for obj in libxdp_objects() {
        let info = inspect_json(&obj);
        let programs = info["programs"].as_array().unwrap();
        assert!(!programs.is_empty(), "{}: no programs", obj.display());
        for p in programs {
            assert!(!p["section"].as_str().unwrap().is_empty(), "{p}");
            assert!(!p["type"].as_str().unwrap().is_empty(), "{p}");
        }
    }
}

#[test]
fn the_libxdp_dispatcher_shows_its_slots_and_config() {
    let Some(obj) = libxdp_objects()
        .into_iter()
        .find(|p| p.ends_with("xdp-dispatcher.o"))
    else {
        panic!("libxdp1 has no xdp-dispatcher.o");
    };
    let info = inspect_json(&obj);
    let d = find(&info["programs"], "xdp_dispatcher");
    assert_eq!(d["type"], "xdp");
    let functions: Vec<&str> = info["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for slot in 0..10 {
        assert!(
            functions.contains(&format!("prog{slot}").as_str()),
            "{functions:?}"
        );
    }
    let conf = find(&info["globals"], "conf");
    assert_eq!(conf["section"], ".rodata");
    assert_eq!(conf["type"], "struct xdp_dispatcher_config");
}

fn assert_refused(path: &Path, needles: &[&str]) {
    let out = inspect(path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {err}", path.display());
    assert!(out.stdout.is_empty());
    assert!(!err.contains("panicked"), "{}: {err}", path.display());
    assert!(
        err.contains(&path.display().to_string()),
        "file not named: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

#[test]
fn hostile_files_are_refused_with_a_reason() {
    let empty = scratch("empty.o");
    fs::write(&empty, b"").unwrap();
    assert_refused(&empty, &["empty"]);

    let text = scratch("text.o");
    fs::write(&text, b"#!/bin/sh\necho not an object\n").unwrap();
    assert_refused(&text, &["not an ELF file"]);

    let bin_true = Path::new("/bin/true");
    assert_refused(bin_true, &["not an eBPF object", "X86_64"]);

    let missing = scratch("missing.o");
    let _ = fs::remove_file(&missing);
    assert_refused(&missing, &["cannot read"]);

    assert_refused(Path::new("/"), &["directory"]);

    let huge = scratch("huge.o");
    fs::File::create(&huge).unwrap().set_len(1 << 30).unwrap();
    assert_refused(&huge, &["larger than the limit"]);
    fs::remove_file(&huge).unwrap();
}

#[test]
fn truncated_objects_are_refused() {
    let bytes = fs::read(program_o()).unwrap();
    let cut = scratch("cut.o");
    let mut cuts: Vec<usize> = vec![1, 4, 16, 63, 64, 65];
    cuts.extend((128..bytes.len()).step_by(bytes.len() / 24));
    cuts.push(bytes.len() - 1);
    for at in cuts {
        fs::write(&cut, &bytes[..at]).unwrap();
        assert_refused(&cut, &[]);
    }
}

/// A minimal little-endian ELF64 eBPF relocatable object with `n` sections:
/// null, `.shstrtab`, then empty PROGBITS named `.x`, the last one replaced by
/// `last` (name, type, size) when given. Extended numbering (count in section
/// 0) once `n` does not fit `e_shnum`.
fn elf_object(n: usize, last: Option<(&str, u32, u64)>) -> Vec<u8> {
    let mut strtab = b"\0.shstrtab\0.x\0".to_vec();
    let last_name = strtab.len() as u32;
    if let Some((name, _, _)) = last {
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
    }
    let shoff = 64u64;
    let data_off = shoff + 64 * n as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    out.extend_from_slice(&247u16.to_le_bytes()); // EM_BPF
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // entry
    out.extend_from_slice(&0u64.to_le_bytes()); // phoff
    out.extend_from_slice(&shoff.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    out.extend_from_slice(&0u16.to_le_bytes()); // phentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    let shnum = if n < 0xff00 { n as u16 } else { 0 };
    out.extend_from_slice(&shnum.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // shstrndx
    let section = |out: &mut Vec<u8>, name: u32, ty: u32, flags: u64, off: u64, size: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // addr
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // link
        out.extend_from_slice(&0u32.to_le_bytes()); // info
        out.extend_from_slice(&1u64.to_le_bytes()); // align
        out.extend_from_slice(&0u64.to_le_bytes()); // entsize
    };
    let count0 = if n < 0xff00 { 0 } else { n as u64 };
    section(&mut out, 0, 0, 0, 0, count0);
    section(&mut out, 1, 3, 0, data_off, strtab.len() as u64);
    for i in 2..n {
        match last {
            Some((_, ty, size)) if i == n - 1 => {
                section(
                    &mut out, last_name, ty, 3, /* WRITE|ALLOC */
                    data_off, size,
                )
            }
            _ => section(&mut out, 11, 1, 0, data_off, 0),
        }
    }
    out.extend_from_slice(&strtab);
    out
}

#[test]
fn objects_with_too_many_sections_are_refused_quickly() {
    let many = scratch("many.o");
    for n in [5_000, 70_000] {
        fs::write(&many, elf_object(n, None)).unwrap();
        let start = Instant::now();
        // The null section 0 is not counted.
        assert_refused(&many, &["too many sections", &(n - 1).to_string()]);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // Under the limit it is an (empty) object, and still quick.
    fs::write(&many, elf_object(3_000, None)).unwrap();
    let start = Instant::now();
    let info = inspect_json(&many);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(info["programs"], Value::Array(vec![]));
}

#[test]
fn a_huge_bss_is_refused_before_it_is_allocated() {
    let bss = scratch("bss.o");
    const SHT_NOBITS: u32 = 8;
    fs::write(&bss, elf_object(4, Some((".bss", SHT_NOBITS, 1 << 40)))).unwrap();
    assert_refused(&bss, &[".bss", "1099511627776 bytes"]);
    // A small one is fine: an object with no programs.
    fs::write(&bss, elf_object(4, Some((".bss", SHT_NOBITS, 64)))).unwrap();
    let info = inspect_json(&bss);
    assert_eq!(find(&info["maps"], ".bss")["valueSize"], 64);
}
