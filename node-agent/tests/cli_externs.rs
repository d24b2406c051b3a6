#![allow(clippy::unwrap_used)]
//! Externs offline (no kernel, no privileges): `inspect` lists `__kconfig` externs
//! and refuses, with the extern's name, one the loader cannot resolve; `verify`
//! refuses bad arguments before it touches the kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bpfpoly-agent");

fn build(name: &str, source: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_externs");
    fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}.c"));
    let o = dir.join(format!("{name}.o"));
    fs::write(&c, source).unwrap();
    let multiarch = Command::new("clang")
        .arg("-print-multiarch")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let out = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .args(["-idirafter", &format!("/usr/include/{multiarch}")])
        .output()
        .expect("clang (apt-get install clang libbpf-dev)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    o
}

fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn program(body: &str) -> String {
    format!(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n{body}\nchar LICENSE[] SEC(\"license\") = \"GPL\";\n"
    )
}

#[test]
fn inspect_lists_kconfig_externs_with_type_and_weakness() {
    let o = build(
        "listed",
        &program(
            r#"
extern unsigned int LINUX_KERNEL_VERSION __kconfig;
extern enum libbpf_tristate CONFIG_BPF_JIT __kconfig __weak;
extern char CONFIG_LOCALVERSION[8] __kconfig;
SEC("raw_tp/sys_enter")
int prog(void *ctx) { return LINUX_KERNEL_VERSION + CONFIG_BPF_JIT + CONFIG_LOCALVERSION[0]; }
"#,
        ),
    );
    let out = agent(&["inspect", o.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let externs: Vec<(String, String, bool)> = info["externs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
                e["weak"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        externs,
        vec![
            ("LINUX_KERNEL_VERSION".into(), "u32".into(), false),
            ("CONFIG_BPF_JIT".into(), "tristate".into(), true),
            ("CONFIG_LOCALVERSION".into(), "char[8]".into(), false),
        ]
    );
    // The externs are not config globals a variant could write.
    let globals = info["globals"].as_array().unwrap();
    assert!(
        globals.iter().all(|g| g["name"] != "CONFIG_BPF_JIT"),
        "{globals:?}"
    );
}

#[test]
fn unresolvable_externs_are_named_offline() {
    let cases = [
        (
            "unknown_name",
            r#"extern int MY_SETTING __kconfig;
SEC("raw_tp/sys_enter") int prog(void *ctx) { return MY_SETTING; }"#,
            "MY_SETTING",
        ),
        (
            "ksym",
            r#"extern const int some_kernel_variable __ksym;
SEC("raw_tp/sys_enter") int prog(void *ctx) { return *(&some_kernel_variable) ? 1 : 0; }"#,
            "some_kernel_variable",
        ),
        (
            "kfunc",
            r#"extern void bpf_rcu_read_lock(void) __ksym;
SEC("raw_tp/sys_enter") int prog(void *ctx) { bpf_rcu_read_lock(); return 0; }"#,
            "bpf_rcu_read_lock",
        ),
        (
            "bad_type",
            r#"struct s { int a; };
extern struct s CONFIG_STRUCTURED __kconfig;
SEC("raw_tp/sys_enter") int prog(void *ctx) { return CONFIG_STRUCTURED.a; }"#,
            "CONFIG_STRUCTURED",
        ),
    ];
    for (name, body, extern_name) in cases {
        let o = build(name, &program(body));
        let out = agent(&["inspect", o.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("unresolvable extern") && stderr.contains(extern_name),
            "{name}: {stderr}"
        );
        assert!(!stderr.contains("BTF error"), "{name}: {stderr}");
    }
}

#[test]
fn verify_refuses_unknown_programs_and_config_before_loading() {
    let o = build(
        "args",
        &program(
            r#"
const volatile unsigned int rate = 1;
SEC("xdp") int xdp_prog(struct xdp_md *ctx) { return rate ? XDP_PASS : XDP_DROP; }
"#,
        ),
    );
    let path = o.to_str().unwrap();
    let out = agent(&["verify", path, "--program", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("program \"nope\" not found") && stderr.contains("xdp_prog"),
        "{stderr}"
    );
    let out = agent(&[
        "verify",
        path,
        "--config",
        "missing=1",
        "--config",
        "rate=-1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--config missing"), "{stderr}");
    assert!(stderr.contains("--config rate"), "{stderr}");
    let out = agent(&["verify", path, "--config", "novalue"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed pair is a usage error"
    );
}
